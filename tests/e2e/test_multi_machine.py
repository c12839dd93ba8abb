"""Several machines on one: the production layout from ``deploy/`` end to end.

Two web processes (gunicorn with ``deploy/gunicorn.conf.py``, one and two workers)
behind a round-robin load balancer, four ``partner-app worker`` processes (two with
the RQ scheduler, two without) and one ``partner-app cron``, all sharing one database
and one Redis, as separate machines would. Nothing but the database and Redis is shared:
an install started on one web process finishes on whichever the balancer picks.

Three operators connect (one starting on each web process, one through the balancer);
each gets its first API call and its webhook endpoint; the cron's scheduled sync
mirrors every seeded order; 20 new orders per operator arrive as webhooks spread over
both web processes and end up mirrored and on the operator's Stora timeline exactly
once. No issued token, code or webhook secret is found in the database, Redis or any
log. Then a worker busy with a slow job gets SIGTERM: it finishes the job (a warm
shutdown) and exits cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests
import sqlalchemy as sa
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from partner_app.db import db
from partner_app.queueing import get_redis
from tests.conftest import (
    ROOT,
    _truncate_all,
    free_port,
    settings_env,
)
from tests.consent import consent
from tests.e2e.balancer import RoundRobinBalancer
from tests.e2e.conftest import wait_for_http
from tests.e2e.test_install_end_to_end import _database_bytes, _embedded_url, _redis_bytes
from workers.cron import LEADER_KEY

pytestmark = pytest.mark.e2e

NEW_ORDERS = 20
DEADLINE_SECONDS = 240
RAISED_PER_MINUTE = 600
WEB_CONCURRENCY = {"web-a": 1, "web-b": 2}
WORKERS = {"worker-1": [], "worker-2": [], "worker-3": ["--no-scheduler"],
           "worker-4": ["--no-scheduler"]}


@pytest.fixture
def fleet(backend_urls, sandbox, tmp_path, app) -> Iterator[dict[str, Any]]:
    ports = {name: free_port() for name in WEB_CONCURRENCY}
    backends = [("127.0.0.1", port) for port in ports.values()]
    with RoundRobinBalancer(backends) as balancer:
        public = balancer.url
        sandbox.reset()
        sandbox.register_redirect(f"{public}/oauth/callback")
        _truncate_all(app)
        with app.app_context():
            get_redis(app).flushdb()  # starts the embedded Redis if that is the backend
        env = {**os.environ, **settings_env(
            backend_urls, sandbox_url=sandbox.base_url, public_base_url=public,
            LOG_LEVEL="DEBUG", STORA_RATE_PER_MINUTE=str(RAISED_PER_MINUTE))}
        redis_url = env.get("REDIS_URL") or _embedded_url(backend_urls)
        cli = [sys.executable, "-m", "partner_app.cli"]
        procs: dict[str, subprocess.Popen] = {}
        logs: dict[str, Any] = {}

        def spawn(name: str, args: list[str], **extra: str) -> subprocess.Popen:
            logs[name] = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
            procs[name] = subprocess.Popen(args, env={**env, **extra}, cwd=ROOT,
                                           stdout=logs[name], stderr=subprocess.STDOUT,
                                           start_new_session=True)
            return procs[name]

        for name, concurrency in WEB_CONCURRENCY.items():
            spawn(name, [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py",
                         "wsgi:app"], GUNICORN_BIND=f"127.0.0.1:{ports[name]}",
                  WEB_CONCURRENCY=str(concurrency))
        for name, options in WORKERS.items():
            spawn(name, [*cli, "worker", "--name", f"{name}-{os.getpid()}", *options])
        spawn("cron", [*cli, "cron", "--orders-every", "10s"])
        try:
            for name, port in ports.items():
                wait_for_http(f"http://127.0.0.1:{port}/healthz", procs[name])
            yield {"public": public, "webs": {n: f"http://127.0.0.1:{p}" for n, p in
                                               ports.items()},
                   "procs": procs, "logs": tmp_path, "env": env, "redis_url": redis_url,
                   "balancer": balancer}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            for handle in logs.values():
                handle.close()
            sandbox.admin("PATCH", "config", json={"latency_ms": 0})
            sandbox.reset()
            _truncate_all(app)
            with app.app_context():
                db.engine.dispose()


def _connect(start_base: str, operator_name: str) -> None:
    """Start the install on one web process; Stora sends the browser back to the
    public URL, where the balancer picks a web process for the callback."""
    browser = requests.Session()
    start = browser.get(f"{start_base}/install", allow_redirects=False, timeout=10)
    assert start.status_code == 302, start.text
    callback = consent(start.headers["Location"], operator_name=operator_name, session=browser)
    page = browser.get(callback, timeout=15)
    assert page.status_code == 200 and f"Connected: {operator_name}" in page.text, page.text


def _query(engine: sa.Engine, sql: str, **params: Any) -> list[sa.Row]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def _wait(predicate: Callable[[], Any], *, timeout: float, what: str, logs) -> Any:
    until = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > until:
            tails = "\n".join(f"--- {path.name}:\n{path.read_text()[-1500:]}"
                              for path in sorted(logs.glob("*.log")))
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.5)


def test_two_web_processes_four_workers_and_one_cron_share_the_work(fleet, sandbox, app,
                                                                    backend_urls):
    with app.app_context():
        _run(fleet, sandbox, db.engine, backend_urls)


def _run(fleet, sandbox, engine: sa.Engine, backend_urls) -> None:
    logs = fleet["logs"]
    operators = sandbox.operators()[:3]
    names, stora_ids = [op["name"] for op in operators], [op["id"] for op in operators]
    starts = [fleet["webs"]["web-a"], fleet["webs"]["web-b"], fleet["public"]]
    for start, name in zip(starts, names, strict=True):
        _connect(start, name)

    # -- every operator: first API call, an endpoint at Stora, the cron's sync --------------
    _wait(lambda: _query(engine, "SELECT count(*) FROM operators WHERE status = 'active' "
                                 "AND last_api_success_at IS NOT NULL")[0][0] == 3,
          timeout=60, what="three first API calls", logs=logs)
    _wait(lambda: _query(engine, "SELECT count(*) FROM webhook_subscriptions "
                                 "WHERE status = 'active'")[0][0] == 3,
          timeout=60, what="three active subscriptions", logs=logs)
    endpoints = [e for stora_id in stora_ids for e in sandbox.admin(
        "GET", f"webhook_endpoints?operator_id={stora_id}")["webhook_endpoints"]]
    assert len(endpoints) == 3 and all(e["status"] == "enabled" for e in endpoints)
    assert all(e["url"].startswith(f"{fleet['public']}/webhooks/stora/") for e in endpoints)

    sandbox.admin("PATCH", "config", json={"rate_limit_per_minute": RAISED_PER_MINUTE})
    created: list[str] = []
    for stora_id in stora_ids:
        created += [o["id"] for o in sandbox.admin(
            "POST", f"operators/{stora_id}/orders", json={"count": NEW_ORDERS})["orders"]]
    total_new = 3 * NEW_ORDERS

    def settled() -> bool:
        processed = _query(engine, "SELECT count(*) FROM webhook_events "
                                   "WHERE status = 'processed'")[0][0]
        recorded = _query(engine, "SELECT count(*) FROM timeline_events WHERE status = "
                                  "'recorded' AND action_key LIKE 'order.created:%'")[0][0]
        synced = _query(engine, "SELECT count(*) FROM sync_runs WHERE status = 'completed' "
                                "AND total = 3")[0][0]
        return processed == total_new and recorded == total_new and synced >= 1

    _wait(settled, timeout=DEADLINE_SECONDS, what="webhooks processed and a full sync",
          logs=logs)

    # The same end state as with one machine: each order mirrored once, each webhook
    # stored once and processed, one timeline entry per new order.
    at_stora = sum(op["orders"] for op in sandbox.operators()[:3])
    mirrored = [row[0] for row in _query(engine, "SELECT stora_id FROM synced_orders")]
    assert len(mirrored) == len(set(mirrored)) == at_stora
    assert set(created) <= set(mirrored)
    inbox = _query(engine, "SELECT event_type, status FROM webhook_events")
    assert len(inbox) == total_new and set(inbox) == {("order.created", "processed")}
    keys = sorted(row[0] for row in _query(
        engine, "SELECT action_key FROM timeline_events WHERE action_key LIKE 'order.created:%'"))
    assert keys == sorted(f"order.created:{order_id}" for order_id in created)

    # Both web processes served installs, callbacks and webhooks.
    web_logs = {name: (logs / f"{name}.log").read_text() for name in WEB_CONCURRENCY}
    for name, text in web_logs.items():
        assert '"GET /install" 302' in text, f"{name} started no install"
        assert '"POST /webhooks/stora/[redacted]" 200' in text, f"{name} got no webhook"
    # Exactly one cron leads; it is the one we started.
    leader = get_redis_for(fleet).get(LEADER_KEY)
    assert leader and f"cron ready: {leader.decode()}," in (logs / "cron.log").read_text()

    # -- the secret canary ---------------------------------------------------------------
    issued = sandbox.issued_secrets() + [e["secret"] for e in endpoints]
    haystacks = {"database": _database_bytes(backend_urls),
                 "redis": _redis_bytes(fleet["redis_url"]),
                 **{path.name: path.read_bytes() for path in logs.glob("*.log")}}
    leaks = [(where, value[:6] + "…") for value in issued
             for where, data in haystacks.items() if value.encode() in data]
    assert leaks == [], f"issued secrets found in: {leaks}"

    _warm_shutdown(fleet, sandbox, engine)


def get_redis_for(fleet) -> redis.Redis:
    return redis.Redis.from_url(fleet["redis_url"])


def _warm_shutdown(fleet, sandbox, engine: sa.Engine) -> None:
    """SIGTERM a worker in the middle of a slow job: the job finishes, then it exits."""
    logs = fleet["logs"]
    connection = get_redis_for(fleet)
    sandbox.admin("PATCH", "config", json={"latency_ms": 3000})  # every Stora call: 3 s
    operator = _query(engine, "SELECT public_id, id FROM operators ORDER BY id LIMIT 1")[0]
    started = subprocess.run(
        [sys.executable, "-m", "partner_app.cli", "sync", "run", "orders", "--operator",
         operator.public_id, "--no-wait", "--no-timeline"],
        env=fleet["env"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    run_id = int(started.stdout.strip())
    job_id = f"sync-{run_id}-{operator.id}"

    def busy_worker() -> Worker | None:
        for worker in Worker.all(connection=connection, serializer=JSONSerializer):
            if worker.get_current_job_id() == job_id:
                return worker
        return None

    worker = _wait(busy_worker, timeout=60, what=f"a worker to take {job_id}", logs=logs)
    name = worker.name.rsplit("-", 1)[0]
    proc = fleet["procs"][name]
    signalled_at = time.time()
    proc.send_signal(signal.SIGTERM)  # the worker process only, as an orchestrator does
    assert proc.wait(60) == 0
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == "finished", job.get_status()
    assert job.ended_at.timestamp() > signalled_at  # it really was busy when signalled
    item = _query(engine, "SELECT status, attempts FROM sync_run_items "
                          "WHERE run_id = :run AND operator_id = :id", run=run_id,
                  id=operator.id)[0]
    assert tuple(item) == ("succeeded", 1)
    worker_log = (logs / f"{name}.log").read_text()
    assert "warm shut down requested" in worker_log and "stopping on request" in worker_log
