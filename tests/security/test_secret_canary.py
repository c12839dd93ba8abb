"""The secret canary (T-16) itself: the sandbox marks what it issues, the search finds
the marker in every encoding we know of, and a session with a leak fails."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile

from stora_sandbox import create_app as create_sandbox
from stora_sandbox.config import ApplicationSpec, SandboxConfig
from tests.conftest import ROOT
from tests.sandbox.support import ALL_TEST_SCOPES, CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, OAuth
from tests.sandbox.support import bearer as bearer_header
from tests.security import canary


def test_the_sandbox_marks_every_secret_it_issues():
    app = create_sandbox(SandboxConfig(
        applications=(ApplicationSpec(CLIENT_ID, CLIENT_SECRET, (REDIRECT_URI,)),),
        seed="demo", canary=canary.MARKER))
    try:
        oauth = OAuth(app.test_client(), app.extensions["stora_sandbox"])
        code = oauth.code()
        assert code.startswith(f"code_{canary.MARKER}_")
        tokens = oauth.connect(scope=ALL_TEST_SCOPES)
        assert tokens["access_token"].startswith(f"at_{canary.MARKER}_")
        assert tokens["refresh_token"].startswith(f"rt_{canary.MARKER}_")
        refreshed = oauth.refresh(tokens["refresh_token"]).get_json()
        assert refreshed["refresh_token"].startswith(f"rt_{canary.MARKER}_")
        created = oauth.client.post("/2025-09/webhook_endpoints", headers=bearer_header(
            refreshed["access_token"]), json={
            "name": "canary", "api_version": "2025-09", "event_types": ["order.created"],
            "url": "https://hooks.partner.example/stora/webhooks/k1"})
        assert created.status_code == 201, created.get_json()
        assert created.get_json()["endpoint"]["secret"].startswith(f"whsec_{canary.MARKER}_")
    finally:
        app.extensions["stora_sandbox"].dispatcher.stop(timeout=5)


def test_the_search_finds_the_marker_plain_and_encoded():
    token = f"rt_{canary.MARKER}_abc"
    basic = base64.b64encode(f"client:{token}".encode())
    for prefix in ("", "x", "xy"):
        assert canary.found_in(base64.b64encode(f"{prefix}{token}".encode()))
        assert canary.found_in(base64.urlsafe_b64encode(f"{prefix}{token}".encode()))
    assert canary.found_in(f"Authorization: Bearer {token}")
    assert canary.found_in(b"Authorization: Basic " + basic)
    assert canary.found_in(token.encode().hex())
    assert not canary.found_in("rt_[redacted] Bearer [redacted] canary CANARY")
    assert canary.masked(f"key rq:job:{token}:x") == "key rq:job:rt_<canary…>"


def test_a_leak_turns_the_session_red():
    """A nested canary session over three deliberate leaks (log, Redis, plain column):
    every test in it passes, and the session fails naming each place."""
    scratch = tempfile.mkdtemp(prefix="canary-probe-")  # outside this run's scanned dirs
    try:
        env = {**os.environ, "SECRET_CANARY": "1", "TEST_BACKEND": "embedded",
               "SECRET_CANARY_LOG_DIR": os.path.join(scratch, "logs"),
               "PYTHONDONTWRITEBYTECODE": "1"}
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--basetemp", os.path.join(scratch, "tmp"), "tests/security/canary_leak_probe.py"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    output = run.stdout + run.stderr
    assert "3 passed" in output, output
    assert run.returncode == 1, output
    assert "secret canary: 3 hit(s)" in output, output
    assert "log: " in output and "processes.log" in output, output
    assert "redis: rq:job:probe[exc_info]" in output, output
    assert "database: audit_log.detail" in output, output
    assert canary.MARKER not in output  # the report names places, never values
