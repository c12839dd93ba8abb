"""The real thing: ``python -m stora_sandbox`` on a loopback port, driven with ``requests``.

Covers what the Flask test client cannot: dropped connections as a client sees them,
the threaded server, rate limits under concurrent requests and real time, the CLI (flags
and ``STORA_SANDBOX_*`` variables), the ready line, SIGTERM shutdown (also with a webhook
delivery in flight) and the process's own log output.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from tests.sandbox.support import (
    ALL_TEST_SCOPES,
    CLIENT_ID,
    CLIENT_SECRET,
    READ_SCOPES,
    REDIRECT_URI,
    Receiver,
    pkce_pair,
    query_of,
)

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"^stora_sandbox ready on (http://127\.0\.0\.1:\d+)$")


@dataclass
class Running:
    proc: subprocess.Popen[str]
    base_url: str
    stderr_path: Path

    def admin(self, method: str, path: str, **kwargs) -> dict:
        response = requests.request(method, f"{self.base_url}/_sandbox/{path}", timeout=5, **kwargs)
        response.raise_for_status()
        return response.json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()


def start_sandbox(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> Running:
    """Start the CLI with ``--port 0`` semantics and wait for its ready line."""
    stderr_path = tmp_path / "sandbox.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stora_sandbox", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(20)
    match = READY.match(lines[0].strip()) if lines else None
    if match is None:
        proc.kill()
        raise AssertionError(f"no ready line; stderr: {stderr_path.read_text()}")
    return Running(proc, match.group(1), stderr_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_sandbox(
        tmp_path_factory.mktemp("server"),
        [
            "--host", "127.0.0.1", "--port", "0", "--client-id", CLIENT_ID,
            "--client-secret", CLIENT_SECRET, "--redirect-uri", REDIRECT_URI,
            "--redirect-uri", "http://127.0.0.1:9/second", "--seed", "demo",
        ],
    )  # fmt: skip
    yield running
    assert running.stop() == 0


@pytest.fixture
def fresh(server: Running) -> Running:
    server.admin("POST", "reset", json={})
    return server


def connect(server: Running, operator: str = "Leeds", scope: str = READ_SCOPES) -> dict:
    """Authorize through the consent form and exchange the code, over real HTTP."""
    operators = server.admin("GET", "operators")["operators"]
    operator_id = next(o["id"] for o in operators if o["name"].startswith(operator))
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    page = requests.get(f"{server.base_url}/oauth2/authorize?{urlencode(params)}", timeout=5)
    assert page.status_code == 200
    decision = requests.post(
        f"{server.base_url}/oauth2/authorize",
        data={**params, "operator_id": operator_id, "decision": "approve"},
        allow_redirects=False,
        timeout=5,
    )
    query = query_of(decision.headers["Location"])
    assert query["state"] == "s1"
    response = requests.post(
        f"{server.base_url}/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "code": query["code"],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        auth=(CLIENT_ID, CLIENT_SECRET),
        timeout=5,
    )
    assert response.status_code == 200, response.text
    return response.json()


def refresh(server: Running, refresh_token: str) -> requests.Response:
    return requests.post(
        f"{server.base_url}/oauth2/token",
        json={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        timeout=5,
    )


def token_count(server: Running) -> int:
    return len(server.admin("GET", "tokens")["tokens"])


def test_drop_after_commit_is_a_connection_error_after_rotation(fresh: Running) -> None:
    tokens = connect(fresh)
    before = token_count(fresh)
    fresh.admin(
        "POST",
        "faults",
        json={"endpoint": "token", "mode": "drop_after_commit", "grant_type": "refresh_token"},
    )
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        refresh(fresh, tokens["refresh_token"])
    assert time.monotonic() - started < 4  # closed promptly, not a hang until timeout
    assert token_count(fresh) == before + 2  # a new access and refresh token exist
    log = fresh.admin("GET", "requests")["requests"][-1]
    assert (log["path"], log["status"], log["dropped"]) == ("/oauth2/token", None, True)
    # The server keeps serving, and in on_use mode the retry succeeds.
    retry = refresh(fresh, tokens["refresh_token"])
    assert retry.status_code == 200
    api = requests.get(
        f"{fresh.base_url}/2025-09/sites",
        headers={"Authorization": f"Bearer {retry.json()['access_token']}"},
        timeout=5,
    )
    assert api.status_code == 200


def test_drop_before_commit_is_a_connection_error_with_nothing_issued(fresh: Running) -> None:
    tokens = connect(fresh)
    before = token_count(fresh)
    fresh.admin("POST", "faults", json={"endpoint": "token", "mode": "drop_before_commit"})
    with pytest.raises(requests.ConnectionError):
        refresh(fresh, tokens["refresh_token"])
    assert token_count(fresh) == before


def test_drop_on_a_keep_alive_session(fresh: Running) -> None:
    tokens = connect(fresh)
    fresh.admin("POST", "faults", json={"endpoint": "api", "mode": "drop_after_commit"})
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {tokens['access_token']}"
        with pytest.raises(requests.ConnectionError):
            session.get(f"{fresh.base_url}/2025-09/orders", timeout=5)
        assert session.get(f"{fresh.base_url}/2025-09/orders", timeout=5).status_code == 200


def test_threaded_server_serves_while_a_request_is_slow(fresh: Running) -> None:
    tokens = connect(fresh)
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    fresh.admin("POST", "faults", json={"endpoint": "api", "latency_ms": 1500})
    with ThreadPoolExecutor(max_workers=8) as pool:
        slow = pool.submit(
            requests.get, f"{fresh.base_url}/2025-09/sites", headers=headers, timeout=10
        )
        time.sleep(0.2)
        started = time.monotonic()
        fast = [
            pool.submit(
                requests.get, f"{fresh.base_url}/2025-09/orders", headers=headers, timeout=10
            )
            for _ in range(6)
        ]
        assert all(f.result().status_code == 200 for f in fast)
        assert time.monotonic() - started < 1.0
        assert not slow.done()
        assert slow.result().status_code == 200


@pytest.mark.parametrize(("mode", "successes"), [("immediate", 1), ("on_use", 12)])
def test_concurrent_refreshes_with_one_token(fresh: Running, mode: str, successes: int) -> None:
    fresh.admin("PATCH", "config", json={"revocation_mode": mode})
    tokens = connect(fresh)
    barrier = threading.Barrier(12)

    def race() -> int:
        barrier.wait()
        return refresh(fresh, tokens["refresh_token"]).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(lambda _: race(), range(12)))
    assert codes.count(200) == successes
    assert codes.count(400) == 12 - successes


def test_process_logs_carry_no_secrets(fresh: Running) -> None:
    tokens = connect(fresh, "Camden", scope=ALL_TEST_SCOPES)
    refresh(fresh, tokens["refresh_token"])
    access = refresh(fresh, tokens["refresh_token"]).json()["access_token"]
    receiver = Receiver()
    try:
        created = requests.post(
            f"{fresh.base_url}/2025-09/webhook_endpoints",
            json={
                "name": "hooks",
                "api_version": "2025-09",
                "url": receiver.url,
                "event_types": ["order.created"],
            },
            headers={"Authorization": f"Bearer {access}", "Idempotency-Key": "create-1"},
            timeout=5,
        )
        assert created.status_code == 201
        webhook_secret = created.json()["endpoint"]["secret"]
        operator_id = next(
            o["id"] for o in fresh.admin("GET", "operators")["operators"] if "Camden" in o["name"]
        )
        fresh.admin("POST", f"operators/{operator_id}/orders", json={})
        (delivery,) = receiver.wait_for(1)
    finally:
        receiver.close()
    signature = delivery.header("X-Stora-Signature") or ""
    values = [t["value"] for t in fresh.admin("GET", "tokens")["tokens"]]
    time.sleep(0.3)  # let the log lines reach the file
    log = fresh.stderr_path.read_text()
    assert "POST /oauth2/token 200" in log
    assert "GET /oauth2/authorize 200" in log
    assert "POST /2025-09/webhook_endpoints 201" in log
    assert re.search(
        r"webhook evt_[0-9a-f]{16} order\.created -> we_[0-9a-f]{16} attempt 1: 200", log
    )
    assert "state=" not in log and "code_challenge" not in log  # no query strings
    for secret in [*values, CLIENT_SECRET, webhook_secret, signature.split("v1=")[-1]]:
        assert secret not in log


def test_concurrent_requests_respect_the_default_limits(fresh: Running) -> None:
    access = connect(fresh)["access_token"]
    since = fresh.admin("GET", "requests")["requests"][-1]["seq"]
    headers = {"Authorization": f"Bearer {access}"}

    def call(_n: int) -> int:
        return requests.get(
            f"{fresh.base_url}/2025-09/sites", headers=headers, timeout=10
        ).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        codes = list(pool.map(call, range(35)))
    log = [
        e
        for e in fresh.admin("GET", f"requests?since={since}")["requests"]
        if e["endpoint"] == "api"
    ]
    assert len(log) == 35
    per_second: dict[int, int] = {}
    for entry in log:
        assert entry["throttled"] is (entry["status"] == 429)
        if entry["status"] == 200:
            window = math.floor(entry["at"])
            per_second[window] = per_second.get(window, 0) + 1
    assert all(count <= 10 for count in per_second.values())
    assert sum(per_second.values()) == codes.count(200)
    seconds = {math.floor(e["at"]) for e in log}
    assert codes.count(429) >= 35 - 10 * len(seconds) > 0 or len(seconds) > 3


def test_cli_reads_env_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    running = start_sandbox(
        tmp_path,
        [],
        env={
            "STORA_SANDBOX_HOST": "127.0.0.1",
            "STORA_SANDBOX_PORT": "0",
            "STORA_SANDBOX_CLIENT_ID": "env-client",
            "STORA_SANDBOX_CLIENT_SECRET": "env-secret",
            "STORA_SANDBOX_REDIRECT_URI": "http://a.example/cb, http://b.example/cb",
            "STORA_SANDBOX_SET": "revocation_mode=immediate,token_info_operator_id=true",
            "STORA_SANDBOX_PUBLIC_URL": "http://sandbox.example:5001",
        },
    )
    try:
        apps = running.admin("GET", "applications")["applications"]
        assert apps == [
            {
                "client_id": "env-client",
                "name": "Partner application",
                "redirect_uris": ["http://a.example/cb", "http://b.example/cb"],
                "scopes": apps[0]["scopes"],
            }
        ]
        config = running.admin("GET", "config")
        assert config["revocation_mode"] == "immediate"
        assert config["token_info_operator_id"] is True
        assert running.admin("GET", "")["token_url"] == "http://sandbox.example:5001/oauth2/token"
        assert running.admin("GET", "operators") == {"operators": []}
    finally:
        started = time.monotonic()
        assert running.stop() == 0
        assert time.monotonic() - started < 5


def test_cli_turns_limits_off_and_sigterm_stops_webhook_delivery(tmp_path: Path) -> None:
    receiver = Receiver(lambda _n: (500, 0.5))  # fails slowly, so retries stay queued
    running = start_sandbox(
        tmp_path,
        [
            "--port", "0", "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET,
            "--redirect-uri", REDIRECT_URI, "--seed", "demo",
            "--set", "rate_limit_per_second=0", "--set", "rate_limit_per_minute=0",
            "--set", "webhook_time_factor=0.5",
        ],
    )  # fmt: skip
    try:
        config = running.admin("GET", "config")
        assert (config["rate_limit_per_second"], config["rate_limit_per_minute"]) == (0, 0)
        assert config["webhook_time_factor"] == 0.5
        access = connect(running, scope=ALL_TEST_SCOPES)["access_token"]
        headers = {"Authorization": f"Bearer {access}"}
        with requests.Session() as session:
            codes = {
                session.get(
                    f"{running.base_url}/2025-09/sites", headers=headers, timeout=5
                ).status_code
                for _ in range(40)
            }
        assert codes == {200}
        endpoint = requests.post(
            f"{running.base_url}/2025-09/webhook_endpoints",
            json={
                "name": "hooks",
                "api_version": "2025-09",
                "url": receiver.url,
                "event_types": ["order.created"],
            },
            headers=headers,
            timeout=5,
        )
        assert endpoint.status_code == 201
        operator_id = running.admin("GET", "operators")["operators"][0]["id"]
        running.admin("POST", f"operators/{operator_id}/orders", json={"count": 2})
        receiver.wait_for(1)
    finally:
        started = time.monotonic()
        assert running.stop() == 0
        assert time.monotonic() - started < 5
        time.sleep(0.6)
        delivered = len(receiver.received)
        receiver.close()
    # The attempt in flight finished; nothing was sent after the process stopped.
    assert delivered <= 2


def test_cli_rejects_bad_switches(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stora_sandbox", "--port", "0", "--set", "revocation_mode=never"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert "revocation_mode" in result.stderr
    assert result.stdout == ""
