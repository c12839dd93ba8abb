"""Command line: run the sandbox on a threaded werkzeug server.

Usage::

    python -m stora_sandbox [--host 127.0.0.1] [--port 5001]
        [--client-id ID --client-secret SECRET --redirect-uri URI [--redirect-uri URI2 ...]]
        [--seed demo] [--public-url http://127.0.0.1:5001]
        [--set name=value ...] [--log-level INFO] [--canary MARKER]

Every flag falls back to an environment variable ``STORA_SANDBOX_<FLAG>`` (upper case,
dashes as underscores). ``STORA_SANDBOX_REDIRECT_URI`` may hold several URIs separated
by spaces or commas; ``STORA_SANDBOX_SET`` holds ``name=value`` pairs separated by
commas. ``--set`` presets a runtime switch (see ``GET /_sandbox/config``), e.g.
``--set revocation_mode=immediate``. ``--port 0`` picks a free port. ``--canary MARKER``
makes every code, token and webhook secret it issues carry MARKER (``at_MARKER_…``),
so a client under test can be searched for leaks of any of them with one string.

Rate limits are on by default (10/s and 60/min per access token, as Stora documents);
``--set rate_limit_per_second=0 --set rate_limit_per_minute=0`` turns them off.

Once listening it prints exactly one line to stdout,
``stora_sandbox ready on http://HOST:PORT``, and it shuts down cleanly on SIGTERM or
SIGINT: the server stops accepting requests, then the webhook dispatcher drops queued
attempts and waits (at most 5 s) for one in flight. Requests and webhook attempts are
logged to stderr without query strings, tokens, secrets or signatures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server

from stora_sandbox import create_app
from stora_sandbox.config import ApplicationSpec, SandboxConfig, Switches
from stora_sandbox.seed import SEEDS

ENV_PREFIX = "STORA_SANDBOX_"
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


class QuietRequestHandler(WSGIRequestHandler):
    """Werkzeug's handler minus its access log.

    The app logs every request itself (:mod:`stora_sandbox.hooks`) without the query
    string; werkzeug's line would include it.
    """

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


def _split(value: str, separators: str) -> list[str]:
    for sep in separators[1:]:
        value = value.replace(sep, separators[0])
    return [part for part in value.split(separators[0]) if part]


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Parse flags, filling unset ones from ``STORA_SANDBOX_*`` variables."""

    def env(name: str) -> str | None:
        return environ.get(ENV_PREFIX + name)

    parser = argparse.ArgumentParser(
        prog="python -m stora_sandbox", description="Run the local Stora sandbox."
    )
    parser.add_argument("--host", default=env("HOST") or "127.0.0.1")
    parser.add_argument("--port", type=int, default=env("PORT") or 5001)
    parser.add_argument("--client-id", default=env("CLIENT_ID"))
    parser.add_argument("--client-secret", default=env("CLIENT_SECRET"))
    parser.add_argument(
        "--redirect-uri",
        action="append",
        help="registered redirect URI (repeatable)",
    )
    parser.add_argument("--seed", default=env("SEED"), choices=SEEDS)
    parser.add_argument("--public-url", default=env("PUBLIC_URL"))
    parser.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="preset a runtime switch (repeatable)",
    )
    parser.add_argument("--log-level", default=env("LOG_LEVEL") or "INFO")
    parser.add_argument(
        "--canary",
        default=env("CANARY") or "",
        help="a marker every issued code, token and webhook secret carries",
    )
    args = parser.parse_args(argv)
    if args.redirect_uri is None:
        args.redirect_uri = _split(env("REDIRECT_URI") or "", " ,")
    if args.set is None:
        args.set = _split(env("SET") or "", ",")
    if args.client_id and not (args.client_secret and args.redirect_uri):
        parser.error("--client-id needs --client-secret and at least one --redirect-uri")
    return args


def _coerce(name: str, raw: str, default: Any) -> Any:
    """Turn a ``--set`` string into the switch's type."""
    if isinstance(default, bool):
        word = raw.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise ValueError(f"{name} must be true or false")
        return word in TRUE_WORDS
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, int):
        return int(raw)
    return raw


def switches_from(assignments: Sequence[str]) -> Switches:
    """Build switches from ``name=value`` strings. Raises ValueError on bad input."""
    defaults = Switches()
    known = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    changes: dict[str, Any] = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"bad --set {item!r}; known switches: {', '.join(sorted(known))}")
        changes[name] = _coerce(name, raw, known[name])
    return defaults.updated(changes)


def build_config(args: argparse.Namespace) -> SandboxConfig:
    applications = ()
    if args.client_id:
        applications = (
            ApplicationSpec(
                client_id=args.client_id,
                client_secret=args.client_secret,
                redirect_uris=tuple(args.redirect_uri),
            ),
        )
    return SandboxConfig(
        applications=applications,
        seed=args.seed,
        public_url=args.public_url,
        switches=switches_from(args.set),
        canary=args.canary,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, os.environ)
    try:
        config = build_config(args)
        app = create_app(config)
    except ValueError as exc:
        print(f"stora_sandbox: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    server = make_server(
        args.host, args.port, app, threaded=True, request_handler=QuietRequestHandler
    )
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # serve_forever runs in a worker thread so the main thread stays free for signals;
    # server.shutdown() blocks until the loop exits and must not run on the loop's thread.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="stora_sandbox"
    )
    thread.start()
    print(f"stora_sandbox ready on http://{args.host}:{server.port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    thread.join(timeout=10)
    store = app.extensions["stora_sandbox"]
    # Wait for an attempt in flight, but never hold up shutdown for long.
    store.dispatcher.stop(timeout=min(store.switches.webhook_timeout_s, 5.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
