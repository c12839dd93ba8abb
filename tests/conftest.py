"""Shared fixtures.

Backends: ``TEST_BACKEND=services`` uses the machine's PostgreSQL (a fresh schema per
run in database ``test``) and Redis (a dedicated db number); ``TEST_BACKEND=embedded``
uses a SQLite file and the embedded Redis, exactly what a newcomer gets. Unset, it picks
``services`` when PostgreSQL answers on 127.0.0.1:5432, else ``embedded``.

``sandbox`` is a real ``stora_sandbox`` process on a loopback port, shared by the run and
reset before each test that uses it.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import sqlalchemy as sa

from partner_app import create_app
from partner_app.db import db
from partner_app.settings import Settings
from tests.browser import browser  # noqa: F401  (a fixture for every browser test)
from tests.security import canary

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
TEST_CLIENT_ID = "partner-test-client"
TEST_CLIENT_SECRET = canary.secret("insecure-test-client-secret")
TEST_ENCRYPTION_KEYS = "t1:" + "dGVzdC1rZXktMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA="


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def _backend() -> str:
    chosen = os.environ.get("TEST_BACKEND", "").strip()
    if chosen:
        return chosen
    return "services" if _port_open("127.0.0.1", 5432) else "embedded"


BACKEND = _backend()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_report_header(config) -> str:
    return f"partner-app test backend: {BACKEND}" + (
        "; secret canary on" if canary.enabled() else "")


def pytest_configure(config) -> None:
    if canary.enabled():
        canary.configure(config)


def pytest_sessionfinish(session) -> None:
    if canary.enabled():
        canary.finish(session)


@pytest.fixture(autouse=True)
def _secret_canary_sweep(request) -> Iterator[None]:
    """Under the canary, search Redis after every test that used it (the next test may
    flush it without looking)."""
    yield
    if canary.enabled() and "backend_urls" in request.fixturenames:
        canary.scan_redis_url(_redis_url_of(request.getfixturevalue("backend_urls")))


def _redis_url_of(urls: dict) -> str:
    if urls["redis_url"]:
        return urls["redis_url"]
    from partner_app import embedded_redis

    return embedded_redis.url_for_instance(urls["instance"])


@pytest.fixture(scope="session")
def backend_urls(tmp_path_factory) -> Iterator[dict[str, str | None]]:
    """DATABASE_URL and REDIS_URL for this run, created fresh, removed afterwards."""
    instance = tmp_path_factory.mktemp("instance")
    if BACKEND == "services":
        schema = f"pt_{os.getpid()}_{secrets.token_hex(3)}"
        admin = sa.create_engine(PG_BASE)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = f"{PG_BASE}?options=-csearch_path%3D{schema}"
        redis.Redis.from_url(REDIS_BASE).flushdb()
        yield {"database_url": url, "redis_url": REDIS_BASE, "instance": str(instance),
               "schema": schema}
        _canary_final_scan(url, REDIS_BASE)
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    else:
        yield {"database_url": f"sqlite:///{instance / 'partner.db'}", "redis_url": None,
               "instance": str(instance), "schema": None}
        from partner_app import embedded_redis

        _canary_final_scan(f"sqlite:///{instance / 'partner.db'}",
                           embedded_redis.url_for_instance(str(instance)))

        embedded_redis.stop(str(instance))


def _canary_final_scan(database_url: str, redis_url: str) -> None:
    """Under the canary, search what the run left before it is dropped."""
    if not canary.enabled():
        return
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            canary.scan_database(conn)
    finally:
        engine.dispose()
    canary.scan_redis_url(redis_url)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Iterator[Sandbox]:
    """A real stora_sandbox process on loopback, for the whole run."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("sandbox") / "sandbox.log"
    log_file = open(log_path, "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stora_sandbox", "--host", "127.0.0.1", "--port", str(port),
         "--client-id", TEST_CLIENT_ID,
         "--redirect-uri", "http://127.0.0.1:5999/oauth/callback", "--seed", "demo"],
        env={**os.environ, "STORA_SANDBOX_CLIENT_SECRET": TEST_CLIENT_SECRET},
        cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not _port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"stora_sandbox did not start; see {log_path}")
        time.sleep(0.05)
    box = Sandbox(base, log_path)
    yield box
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log_file.close()


class Sandbox:
    """Handle on the sandbox process: its URL and its admin API."""

    def __init__(self, base_url: str, log_path: Path):
        self.base_url = base_url
        self.log_path = log_path
        self.http = requests.Session()

    def admin(self, method: str, path: str, **kwargs) -> dict:
        resp = self.http.request(method, f"{self.base_url}/_sandbox/{path.lstrip('/')}",
                                 timeout=10, **kwargs)
        resp.raise_for_status()
        return resp.json() if resp.content else {}

    def register_redirect(self, redirect_uri: str) -> None:
        self.admin("POST", "applications", json={
            "client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET,
            "redirect_uris": [redirect_uri]})

    def reset(self) -> None:
        self.admin("POST", "reset", json={"seed": "demo"})
        self.admin("DELETE", "faults")
        self.admin("DELETE", "requests")

    def operators(self) -> list[dict]:
        return self.admin("GET", "operators")["operators"]

    def requests_log(self, since: int = 0) -> list[dict]:
        return self.admin("GET", f"requests?since={since}")["requests"]

    def issued_secrets(self) -> list[str]:
        """Every token and code value the sandbox ever issued."""
        body = self.admin("GET", "tokens")
        values = []
        for item in body.get("tokens", []) + body.get("codes", []):
            for key in ("access_token", "refresh_token", "code", "value"):
                if item.get(key):
                    values.append(item[key])
        return values


def settings_env(urls: dict, *, sandbox_url: str = "http://127.0.0.1:9",
                 public_base_url: str = "http://127.0.0.1:5999", **extra: str) -> dict[str, str]:
    """The environment a process of this test run needs (for subprocesses too)."""
    env = {
        "APP_ENV": "test",
        "DATABASE_URL": urls["database_url"],
        "INSTANCE_PATH": urls["instance"],
        "SECRET_KEY": canary.secret("insecure-test-secret-key-0123456789"),
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS,
        "STORA_CLIENT_ID": TEST_CLIENT_ID,
        "STORA_CLIENT_SECRET": TEST_CLIENT_SECRET,
        "STORA_API_BASE": sandbox_url,
        "PUBLIC_BASE_URL": public_base_url,
        "LOG_LEVEL": "INFO",
        **canary.env(),
        **extra,
    }
    if urls["redis_url"]:
        env["REDIS_URL"] = urls["redis_url"]
    return env


def make_settings(urls: dict, **kwargs: str) -> Settings:
    return Settings.from_env(settings_env(urls, **kwargs))


@pytest.fixture(scope="session")
def app_env(backend_urls, sandbox) -> dict[str, str]:
    return settings_env(backend_urls, sandbox_url=sandbox.base_url)


@pytest.fixture(scope="session")
def settings(app_env) -> Settings:
    return Settings.from_env(app_env)


@pytest.fixture(scope="session")
def app(settings):
    """The app with the schema migrated to head once for the run."""
    from flask_migrate import upgrade

    application = create_app(settings)
    with application.app_context():
        upgrade()
    return application


def _truncate_all(application) -> None:
    with application.app_context():
        tables = list(reversed(db.metadata.sorted_tables))
        with db.engine.begin() as conn:
            if canary.enabled():
                canary.scan_database(conn)
            if conn.dialect.name == "postgresql":
                names = ", ".join(f'"{t.name}"' for t in tables)
                conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            else:
                for table in tables:
                    conn.execute(table.delete())
        db.session.remove()


@pytest.fixture
def clean_app(app, sandbox):
    """The app with empty tables, an empty queue and a freshly seeded sandbox."""
    sandbox.reset()
    sandbox.register_redirect(app.extensions["settings"].redirect_uri)
    from partner_app.queueing import get_redis

    with app.app_context():
        if canary.enabled():
            canary.scan_redis(get_redis(app))
        get_redis(app).flushdb()
    # This process "asked for a drain a moment ago" (webhooks.jobs.request_drain) only
    # while that drain's marker lives in Redis, which was just emptied.
    from partner_app.webhooks import jobs as webhook_jobs

    webhook_jobs._last_request = -1e9
    yield app
    _truncate_all(app)


@pytest.fixture
def client(clean_app):
    return clean_app.test_client()


@pytest.fixture
def app_ctx(clean_app):
    with clean_app.app_context():
        yield clean_app
        db.session.remove()
