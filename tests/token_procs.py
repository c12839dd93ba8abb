"""Entry points for child processes in token-lifecycle tests (importable under spawn).

Each child builds the real app from an environment dict and calls the real
``get_access_token``; it reports only a SHA-256 of what it got, never the token.
"""

from __future__ import annotations

import hashlib
import os
import traceback


def _app(env: dict[str, str]):
    os.environ.update(env)
    from partner_app import create_app
    from partner_app.settings import Settings

    return create_app(Settings.from_env(env))


def refresh_once(env: dict[str, str], operator_id: int, use_redis: bool, barrier,
                 results) -> None:
    """Wait for every sibling, then ask for a token at the same moment."""
    try:
        app = _app(env)
        with app.app_context():
            from partner_app.connections.tokens import get_access_token
            from partner_app.queueing import get_redis

            redis = get_redis(app) if use_redis else None
            barrier.wait(timeout=60)
            token = get_access_token(operator_id, vault=app.extensions["vault"],
                                     oauth=app.extensions["stora_oauth"], redis=redis)
            results.put(("ok", hashlib.sha256(token.encode()).hexdigest()))
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def refresh_until_killed(env: dict[str, str], operator_id: int) -> None:
    """Run a refresh; a failpoint in ``env`` kills this process part-way."""
    app = _app(env)
    with app.app_context():
        from partner_app.connections.tokens import get_access_token

        get_access_token(operator_id, vault=app.extensions["vault"],
                         oauth=app.extensions["stora_oauth"])
