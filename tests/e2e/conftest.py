"""Real processes for end-to-end tests: the web app under gunicorn and an RQ worker
with its scheduler, against the run's database, Redis and sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import (
    ROOT,
    _truncate_all,
    free_port,
    settings_env,
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


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` every 50 ms; its first truthy value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def horse_of(worker: subprocess.Popen) -> psutil.Process:
    """The worker's work-horse: the child that leads its own process group (the horse
    calls setpgrp); the scheduler child shares the worker's group."""
    def find():
        for child in psutil.Process(worker.pid).children():
            try:
                if os.getpgid(child.pid) == child.pid:
                    return child
            except ProcessLookupError:
                continue
        return None
    return wait_until(find, 10, "the work-horse")


@pytest.fixture
def stack(backend_urls, sandbox, tmp_path, app):
    """Web + worker processes against the run's database, Redis and sandbox."""
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    sandbox.reset()
    sandbox.register_redirect(f"{public}/oauth/callback")
    _truncate_all(app)
    # The canary runs with the noisiest logging we ship.
    env = {**os.environ, **settings_env(backend_urls, sandbox_url=sandbox.base_url,
                                        public_base_url=public, LOG_LEVEL="DEBUG")}
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


