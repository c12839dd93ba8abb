"""Metrics and logs across real processes: ``partner-app web`` (gunicorn, 2 workers) and
``partner-app worker`` (forking work-horses) share one ``PROMETHEUS_MULTIPROC_DIR``; a
webhook delivery answered by either gunicorn worker and a Stora API call made in a
work-horse both show on ``/metrics``, whichever worker answers the scrape. Their JSON
log lines carry the request id, the job id and the operator id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from partner_app.connections.models import Operator
from partner_app.db import db
from tests.conftest import ROOT, free_port, settings_env
from tests.integration.test_install_flow import LEEDS, install
from tests.integration.test_webhook_receiver import envelope, make_hook, signed_headers

pytestmark = pytest.mark.e2e

DELIVERIES = 24


def _metrics(base: str) -> dict[tuple[str, tuple], float]:
    # A new connection each time, so scrapes land on either gunicorn worker.
    resp = requests.get(f"{base}/metrics", timeout=10, headers={"Connection": "close"})
    assert resp.status_code == 200, resp.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def _json_lines(path: Path) -> list[dict]:
    """Every log line, parsed; the one human line is the worker's start banner."""
    lines = []
    for raw in path.read_text().splitlines():
        if raw.startswith("worker ready:"):
            continue
        try:
            lines.append(json.loads(raw))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {raw!r}") from None
    return lines


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _replace_gunicorn_workers(master: subprocess.Popen, base: str) -> None:
    """SIGTERM every worker of the gunicorn master; wait for two fresh ones to answer."""
    old = _children(master.pid)
    assert len(old) == 2, old
    for pid in old:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:
        current = _children(master.pid)
        if len(current) == 2 and not current & old:
            try:
                if requests.get(f"{base}/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
        assert time.monotonic() < deadline, f"gunicorn workers not replaced: {old} {current}"
        time.sleep(0.1)


@pytest.fixture
def observed(clean_app, backend_urls, sandbox, tmp_path):
    """Env, log paths and the gunicorn base URL for processes that share a metrics dir."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {**os.environ,
           **settings_env(backend_urls, sandbox_url=sandbox.base_url,
                          public_base_url="http://127.0.0.1:5999"),
           "LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    env.pop("PARTNER_FAILPOINTS", None)
    web_log = tmp_path / "web.log"
    with open(web_log, "w") as out:
        web = subprocess.Popen([sys.executable, "-m", "partner_app.cli", "web", "--port",
                                str(port), "--workers", "2"], env=env, cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert web.poll() is None, web_log.read_text()
            try:
                requests.get(f"{base}/healthz", timeout=1)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, web_log.read_text()
                time.sleep(0.1)
        yield {"base": base, "env": env, "web_log": web_log, "dir": metrics_dir,
               "tmp": tmp_path, "web": web}
    finally:
        web.terminate()
        try:
            web.wait(15)
        except subprocess.TimeoutExpired:
            web.kill()


def test_metrics_aggregate_web_workers_and_work_horses(observed, client, app_ctx, sandbox):
    base = observed["base"]
    assert requests.get(f"{base}/readyz", timeout=10).json()["ok"] is True

    # Webhook deliveries, concurrently on fresh connections: both gunicorn workers serve.
    hook = make_hook(app_ctx)
    bodies = [json.dumps(envelope()).encode() for _ in range(DELIVERIES)]
    statuses: list[int] = []

    def deliver(body: bytes) -> None:
        resp = requests.post(f"{base}{hook.path}", data=body, timeout=30,
                             headers={**signed_headers(body, hook.secret), "Connection": "close"})
        statuses.append(resp.status_code)

    threads = [threading.Thread(target=deliver, args=(b,)) for b in bodies]
    threads.append(threading.Thread(target=deliver, args=(bodies[0],)))  # a duplicate
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses.count(200) == DELIVERIES + 1
    forged = requests.post(f"{base}{hook.path}", data=bodies[1],
                           headers=signed_headers(bodies[1], "0" * 64), timeout=10)
    assert forged.status_code in (400, 401)

    # One operator connects (in this process); a worker makes its first API call.
    install(client, LEEDS)
    operator_id = db.session.scalars(select(Operator.id).where(Operator.name == LEEDS)).one()
    since = sandbox.requests_log()[-1]["seq"]
    worker_log = observed["tmp"] / "worker.log"
    with open(worker_log, "w") as out:
        subprocess.run([sys.executable, "-m", "partner_app.cli", "worker", "default",
                        "--burst", "--no-scheduler", "--name", f"obs-{os.getpid()}"],
                       env=observed["env"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                       timeout=120, check=True)
    api_calls = [r for r in sandbox.requests_log(since) if r["path"].startswith("/2025-09/")]
    assert api_calls and all(r["status"] == 200 for r in api_calls)

    # The work-horses of one worker share one file instead of leaving one per job.
    files = sorted(p.name for p in observed["dir"].glob("counter_*.db"))
    assert sum(name.endswith("-horse.db") for name in files) == 1, files

    # Replace every gunicorn worker that counted: what the new ones serve can only come
    # from the shared files of processes that are gone.
    _replace_gunicorn_workers(observed["web"], base)

    # Every scrape, whichever worker answers, shows the sum over all processes.
    scrapes = [_metrics(base) for _ in range(6)]
    for values in scrapes:
        assert values[("partner_webhook_deliveries_total", (("outcome", "accepted"),))] \
            == DELIVERIES
        assert values[("partner_webhook_deliveries_total", (("outcome", "duplicate"),))] == 1
        assert values[("partner_webhook_deliveries_total", (("outcome", "rejected"),))] == 1
        assert values[("partner_stora_api_calls_total", (("status", "200"),))] \
            == len(api_calls)
        assert values[("partner_jobs_total", (("outcome", "finished"), ("queue", "default")))] \
            >= 1
        assert values[("partner_http_requests_total", (
            ("method", "POST"), ("route", "/webhooks/stora/<route_key>"),
            ("status", "200")))] == DELIVERIES + 1
        assert values[("partner_operators", (("status", "active"),))] >= 1

    # Log lines: the web's carry request ids (the echoed one included), the worker's the
    # job id and the operator.
    echoed = requests.get(f"{base}/healthz", headers={"X-Request-Id": "obs-e2e-request-1"},
                          timeout=10)
    assert echoed.headers["X-Request-Id"] == "obs-e2e-request-1"
    time.sleep(0.3)  # the access line is written after the response
    web_lines = _json_lines(observed["web_log"])
    access = [line for line in web_lines if line.get("message") == "http.access"]
    assert access and all(line.get("request_id") for line in access)
    assert any(line["request_id"] == "obs-e2e-request-1" and line["path"] == "/healthz"
               for line in access)
    assert not any(hook.route_key in json.dumps(line) for line in web_lines)
    worker_lines = _json_lines(worker_log)
    first_call = [line for line in worker_lines if line.get("message") == "first_api_call.ok"]
    assert len(first_call) == 1
    assert first_call[0]["job_id"] and first_call[0]["operator_id"] == operator_id
    api_debug = [line for line in worker_lines if line.get("message") == "stora.api_call"]
    assert api_debug and all(line["job_id"] == first_call[0]["job_id"]
                             and line["operator_id"] == operator_id for line in api_debug)

    # Nothing the sandbox issued reached a log or a metrics file.
    issued = sandbox.issued_secrets()
    assert issued
    everything = observed["web_log"].read_text() + worker_log.read_text()
    for path in observed["dir"].iterdir():
        everything += path.read_bytes().decode("latin-1")
    assert not [value for value in issued if value in everything]


def test_the_access_log_never_shows_the_callback_query_string(observed):
    base = observed["base"]
    requests.get(f"{base}/oauth/callback?code=code_CANARY_e2e&state=state_CANARY_e2e",
                 timeout=10, allow_redirects=False)
    requests.get(f"{base}/install/link_CANARY_e2e?x=1", timeout=10, allow_redirects=False)
    time.sleep(0.3)
    text = observed["web_log"].read_text()
    assert "/oauth/callback" in text
    assert "CANARY" not in text
