"""Real processes for end-to-end tests: the web app under gunicorn and an RQ worker
with its scheduler, against the run's database, Redis and sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import (
    ROOT,
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_ENCRYPTION_KEYS,
    _truncate_all,
    free_port,
)


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Return once ``url`` answers at all; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process for {url} exited with {proc.returncode}"
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
def stack(backend_urls, sandbox, tmp_path, app):
    """Web + worker processes against the run's database, Redis and sandbox."""
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    sandbox.reset()
    sandbox.register_redirect(f"{public}/oauth/callback")
    _truncate_all(app)
    env = {
        **os.environ,
        "APP_ENV": "test",
        "DATABASE_URL": backend_urls["database_url"],
        "INSTANCE_PATH": backend_urls["instance"],
        "SECRET_KEY": "insecure-e2e-secret-key-0123456789",
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS,
        "STORA_CLIENT_ID": TEST_CLIENT_ID,
        "STORA_CLIENT_SECRET": TEST_CLIENT_SECRET,
        "STORA_API_BASE": sandbox.base_url,
        "PUBLIC_BASE_URL": public,
        # The canary runs with the noisiest logging we ship.
        "LOG_LEVEL": "DEBUG",
    }
    if backend_urls["redis_url"]:
        env["REDIS_URL"] = backend_urls["redis_url"]
    logs = {name: tmp_path / f"{name}.log" for name in ("web", "worker")}
    handles = {name: open(path, "w") for name, path in logs.items()}  # noqa: SIM115
    cli = [sys.executable, "-m", "partner_app.cli"]
    web = subprocess.Popen([*cli, "web", "--port", str(port), "--workers", "2"], env=env,
                           cwd=ROOT, stdout=handles["web"], stderr=subprocess.STDOUT)
    worker = subprocess.Popen([*cli, "worker", "--name", f"e2e-{os.getpid()}"], env=env,
                              cwd=ROOT, stdout=handles["worker"], stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"{public}/healthz", web)
        yield {"public": public, "env": env, "logs": logs, "web": web, "worker": worker}
    finally:
        for proc in (web, worker):
            proc.terminate()
        for proc in (web, worker):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for handle in handles.values():
            handle.close()
        _truncate_all(app)


