"""What every benchmark needs: a database, Redis, a sandbox process, the app's settings.

``BenchEnv`` picks PostgreSQL (a throwaway schema in database ``test``) when it answers
on 127.0.0.1:5432, else SQLite; the machine's Redis (db 12, flushed) when it answers,
else the embedded one; and starts ``stora_sandbox`` on a free loopback port. Everything
is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil
import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-client-secret-not-for-production"
REDIRECT_URI = "http://127.0.0.1:5998/oauth/callback"
# The sandbox switches that make it enforce Stora's per-token limits (10/s, 60/min).
STORA_LIMITS = ["--set", "rate_limit_per_second=10", "--set", "rate_limit_per_minute=60",
                "--set", "rate_limit_key=token"]


@contextlib.contextmanager
def work_folder(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A throwaway folder for one run, removed afterwards unless ``keep`` (then named)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants and the children it reaped (an
    RQ worker's work-horses, PostgreSQL's exited backends)."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += (times.user + times.system + times.children_user
                          + times.children_system)
    return total


def named_cpu(name: str) -> float:
    """CPU seconds of every top-level process called ``name`` (with its tree): the
    machine's PostgreSQL or Redis servers, whoever else is using them included."""
    total = 0.0
    for proc in psutil.process_iter(["name", "ppid"]):
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(proc.info["ppid"]) if proc.info["ppid"] else None
            if proc.info["name"] == name and (parent is None or parent.name() != name):
                total += tree_cpu(proc.pid)
    return total


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BenchEnv:
    """Context manager owning the backends and the sandbox for one benchmark run."""

    def __init__(self, workdir: str, *, sandbox_args: list[str] | None = None):
        self.workdir = Path(workdir)
        self.sandbox_args = sandbox_args or []
        self.backend = "postgresql" if _answers(5432) else "sqlite"
        self.env: dict[str, str] = {}
        self._schema: str | None = None
        self._sandbox: subprocess.Popen | None = None
        self.sandbox_url = ""
        self._http = requests.Session()

    @property
    def backends(self) -> str:
        """The database and the Redis this run used, for the report."""
        return self.backend + " + " + ("redis" if "REDIS_URL" in self.env else "embedded redis")

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> BenchEnv:
        if self.backend == "postgresql":
            self._schema = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
            with sa.create_engine(PG_BASE).begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{self._schema}"'))
            database_url = f"{PG_BASE}?options=-csearch_path%3D{self._schema}"
        else:
            database_url = f"sqlite:///{self.workdir / 'bench.db'}"
        port = _free_port()
        self.sandbox_url = f"http://127.0.0.1:{port}"
        self.env = {
            "APP_ENV": "test",
            "DATABASE_URL": database_url,
            "INSTANCE_PATH": str(self.workdir),
            "SECRET_KEY": "bench-secret-key-not-for-production",
            "ENCRYPTION_KEYS": "bench:" + "YmVuY2gta2V5LTAwMDAwMDAwMDAwMDAwMDAwMDAwMDA=",
            "STORA_CLIENT_ID": CLIENT_ID,
            "STORA_CLIENT_SECRET": CLIENT_SECRET,
            "STORA_API_BASE": self.sandbox_url,
            "PUBLIC_BASE_URL": REDIRECT_URI.rsplit("/oauth", 1)[0],
            "LOG_LEVEL": "WARNING",
        }
        if _answers(6379):
            import redis

            redis.Redis.from_url(REDIS_URL).flushdb()
            self.env["REDIS_URL"] = REDIS_URL
        self._sandbox = subprocess.Popen(
            [sys.executable, "-m", "stora_sandbox", "--host", "127.0.0.1", "--port", str(port),
             "--client-id", CLIENT_ID, "--redirect-uri", REDIRECT_URI,
             "--log-level", "WARNING", *self.sandbox_args],
            env={**os.environ, "STORA_SANDBOX_CLIENT_SECRET": CLIENT_SECRET}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not _answers(port):
            if self._sandbox.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sandbox did not start")
            time.sleep(0.05)
        app = self.app()
        with app.app_context():
            from flask_migrate import upgrade

            upgrade()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._sandbox is not None:
            self._sandbox.terminate()
            self._sandbox.wait(10)
        if self._schema:
            engine = sa.create_engine(PG_BASE)
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{self._schema}" CASCADE'))
            engine.dispose()
        if "REDIS_URL" not in self.env:
            from partner_app import embedded_redis

            embedded_redis.stop(str(self.workdir))

    # -- helpers ------------------------------------------------------------------------
    def app(self):
        os.environ.update(self.env)
        from partner_app import create_app
        from partner_app.settings import Settings

        return create_app(Settings.from_env(self.env))

    def admin(self, method: str, path: str, **kwargs) -> dict:
        resp = self._http.request(method, f"{self.sandbox_url}/_sandbox/{path}", timeout=30,
                                  **kwargs)
        resp.raise_for_status()
        return resp.json() if resp.content else {}

    def sandbox_operator(self, name: str, **counts: int) -> dict:
        return self.admin("POST", "operators", json={"name": name, **counts})

    def request_seq(self) -> int:
        log = self.admin("GET", "requests")["requests"]
        return log[-1]["seq"] if log else 0

    def requests_since(self, seq: int) -> list[dict]:
        return self.admin("GET", f"requests?since={seq}")["requests"]


def obtain_token_set(bench: BenchEnv, oauth, sandbox_operator: dict):
    """Authorize one sandbox operator the way a browser would, without a browser:
    POST the consent decision, then exchange the code through our own StoraOAuth."""
    verifier = secrets.token_urlsafe(48)
    state = secrets.token_urlsafe(16)
    url = oauth.authorization_url(state=state, code_verifier=verifier)
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    resp = bench._http.post(f"{bench.sandbox_url}/oauth2/authorize",
                            data={**query, "operator_id": sandbox_operator["id"],
                                  "decision": "approve"},
                            allow_redirects=False, timeout=30)
    location = resp.headers["Location"]
    code = parse_qs(urlsplit(location).query)["code"][0]
    return oauth.exchange_code(code=code, code_verifier=verifier)
