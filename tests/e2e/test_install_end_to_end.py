"""The whole loop with real processes on loopback: the sandbox, the web app under
gunicorn and an RQ worker with its scheduler. Three operators connect through the
browser flow; each gets its first API call; then no token or code the sandbox issued
may be found in the database, Redis or any process log (the secret canary)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
import sqlalchemy as sa

from tests.consent import consent

pytestmark = pytest.mark.e2e


def _connect(public: str, operator_name: str) -> str:
    browser = requests.Session()
    start = browser.get(f"{public}/install", allow_redirects=False, timeout=10)
    assert start.status_code == 302
    callback = consent(start.headers["Location"], operator_name=operator_name, session=browser)
    page = browser.get(callback, timeout=15)  # follows the 303 to the result page
    assert page.status_code == 200, page.text
    assert f"Connected: {operator_name}" in page.text
    return page.text


def _operators(database_url: str) -> list[dict]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT name, status, last_api_success_at, storefront_host FROM operators"))
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def _database_bytes(urls: dict) -> bytes:
    if urls["schema"]:
        dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-d", "test", "-n", urls["schema"],
                               "--data-only"], capture_output=True, check=True)
        return dump.stdout
    path = Path(urls["database_url"].removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def _redis_bytes(url: str) -> bytes:
    conn = redis.Redis.from_url(url)
    chunks: list[bytes] = []
    for key in conn.scan_iter(count=500):
        chunks.append(key)
        kind = conn.type(key)
        if kind == b"string":
            chunks.append(conn.get(key) or b"")
        elif kind == b"hash":
            for field, value in conn.hgetall(key).items():
                chunks += [field, value]
        elif kind == b"list":
            chunks += conn.lrange(key, 0, -1)
        elif kind == b"set":
            chunks += list(conn.smembers(key))
        elif kind == b"zset":
            chunks += [member for member, _ in conn.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for _, fields in conn.xrange(key):
                for field, value in fields.items():
                    chunks += [field, value]
    return b"\n".join(chunks)


def test_three_operators_connect_and_get_their_first_api_call(stack, sandbox, backend_urls):
    names = [op["name"] for op in sandbox.operators()][:3]
    assert len(names) == 3
    for name in names:
        _connect(stack["public"], name)

    deadline = time.monotonic() + 60
    while True:
        operators = _operators(backend_urls["database_url"])
        done = [op for op in operators if op["last_api_success_at"] is not None]
        if len(done) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert sorted(op["name"] for op in operators) == sorted(names)
    assert all(op["status"] == "active" for op in operators)
    worker_log = stack["logs"]["worker"].read_text()[-3000:]
    assert len(done) == 3, f"first API call missing; worker log:\n{worker_log}"
    assert all(op["storefront_host"] and op["storefront_host"].endswith(".stora.test")
               for op in operators)
    site_calls = [r for r in sandbox.requests_log() if r["path"] == "/2025-09/sites"]
    assert len(site_calls) >= 3 and all(r["status"] == 200 for r in site_calls)

    # -- the secret canary ------------------------------------------------------------
    stack["web"].terminate()
    stack["worker"].terminate()
    stack["web"].wait(15)
    stack["worker"].wait(15)
    secrets_issued = sandbox.issued_secrets()
    assert len(secrets_issued) >= 9  # three codes, three access and three refresh tokens
    haystacks = {
        "database": _database_bytes(backend_urls),
        "redis": _redis_bytes(stack["env"].get("REDIS_URL") or _embedded_url(backend_urls)),
        **{f"{name} log": path.read_bytes() for name, path in stack["logs"].items()},
        "sandbox log": sandbox.log_path.read_bytes(),
    }
    assert b"GET /install" in haystacks["web log"]  # the logs really were captured
    leaks = [(where, value[:6] + "…") for value in secrets_issued
             for where, data in haystacks.items() if value.encode() in data]
    assert leaks == [], f"issued secrets found in: {leaks}"


def _embedded_url(urls: dict) -> str:
    from partner_app import embedded_redis

    return embedded_redis.url_for_instance(urls["instance"])

