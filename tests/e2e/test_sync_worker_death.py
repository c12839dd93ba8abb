"""T-13 (reliability.md §8): a sync job's process dies mid-job; RQ delivers the job
again and its effect is applied once: one row per Stora order, resumed from the cursor.

1. The work-horse is SIGKILLed; the real ``partner-app worker`` notices at once, and
   its ``Retry`` re-delivers the job through the worker's scheduler.
2. The whole worker (and horse) is SIGKILLed; RQ's maintenance finds the job abandoned
   once its heartbeat lapses and retries it, and a fresh worker runs it. The heartbeat
   TTL is at least 60 s and the dead scheduler's lock 61 s, so the test runs RQ's own
   maintenance step with its clock moved past them instead of waiting.
3. The same kill with a live worker already running, and nothing done by the test: the
   live worker's own maintenance takes the job and the scheduler over (about 100 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from sqlalchemy import func, select

from partner_app.db import db
from partner_app.queueing import QUEUE_SYNC, get_queue, get_redis
from partner_app.sync import jobs as sync_jobs
from partner_app.sync.models import SyncedOrder, SyncRunItem
from partner_app.sync.services import start_sync
from tests.conftest import (
    ROOT,
    _truncate_all,
    settings_env,
)
from tests.e2e.conftest import horse_of, wait_until
from tests.integration.test_sync import connect_direct, order_requests

pytestmark = pytest.mark.e2e

ORDERS = 600  # 7 pages of 100
LATENCY_MS = 250


@pytest.fixture
def world(app, backend_urls, sandbox, tmp_path) -> Iterator[dict]:
    """A fresh sandbox, database and Redis, and a way to start real workers."""
    sandbox.reset()
    sandbox.register_redirect(app.extensions["settings"].redirect_uri)
    _truncate_all(app)
    with app.app_context():
        get_redis(app).flushdb()
    env = {**os.environ, **settings_env(backend_urls, sandbox_url=sandbox.base_url)}
    procs: list[subprocess.Popen] = []
    logs = []

    def start_worker(name: str, **extra_env: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed at teardown)
        logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "partner_app.cli", "worker", QUEUE_SYNC,
                                 "--name", f"{name}-{os.getpid()}"],
                                env={**env, **extra_env}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    with app.app_context():
        yield {"start_worker": start_worker, "app": app, "logs": tmp_path}
        db.session.remove()
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    for log in logs:
        log.close()
    sandbox.admin("PATCH", "config", json={"latency_ms": 0})
    _truncate_all(app)


def _operator_with_orders(app, sandbox) -> tuple[int, str]:
    created = sandbox.admin("POST", "operators", json={"name": "Killed Worker Storage",
                                                        "orders": ORDERS, "sites": 2})
    return connect_direct(app, sandbox, created["id"]), created["id"]


def _item(run_id: int, operator_id: int) -> SyncRunItem:
    db.session.expire_all()
    item = db.session.scalars(select(SyncRunItem).where(
        SyncRunItem.run_id == run_id, SyncRunItem.operator_id == operator_id)).one()
    db.session.rollback()
    return item


def _start_run(operator_id: int) -> int:
    run = start_sync("orders", requested_by="t13", operator_id=operator_id,
                     record_timeline=False)
    db.session.commit()
    return run.id


def _assert_applied_once(run_id: int, operator_id: int, sandbox, since: int,
                         within: float = 40) -> SyncRunItem:
    item = wait_until(lambda: (lambda i: i if i.status in ("succeeded", "failed") else None)(
        _item(run_id, operator_id)), within, "the item to settle")
    assert item.status == "succeeded", item.error
    rows = db.session.scalar(select(func.count()).select_from(SyncedOrder))
    distinct = db.session.scalar(select(func.count(func.distinct(SyncedOrder.stora_id))))
    db.session.rollback()
    assert rows == distinct == ORDERS
    # Resumed from the cursor: far fewer requests than two full walks.
    requests_made = len(order_requests(sandbox, since))
    assert requests_made <= 7 + 2, requests_made
    return item


def test_a_killed_work_horse_is_retried_and_resumes_from_the_cursor(world, sandbox):
    app = world["app"]
    operator_id, _ = _operator_with_orders(app, sandbox)
    sandbox.admin("PATCH", "config", json={"latency_ms": LATENCY_MS})
    since = sandbox.requests_log()[-1]["seq"]
    worker = world["start_worker"]("t13-horse")
    run_id = _start_run(operator_id)

    wait_until(lambda: _item(run_id, operator_id).pages >= 2, 20, "two committed pages")
    horse = horse_of(worker)
    horse.send_signal(signal.SIGKILL)
    pages_at_kill = _item(run_id, operator_id).pages

    item = _assert_applied_once(run_id, operator_id, sandbox, since)
    assert worker.poll() is None  # the worker survived its horse
    assert item.attempts == 2 and item.pages >= pages_at_kill
    job = get_queue(QUEUE_SYNC).fetch_job(sync_jobs.job_id(run_id, operator_id))
    assert job.retries_left == sync_jobs.SYNC_RETRY.max - 1
    assert "Work-horse terminated unexpectedly" in \
        (world["logs"] / "t13-horse.log").read_text()


def test_a_killed_worker_is_recovered_by_maintenance(world, sandbox, monkeypatch):
    app = world["app"]
    operator_id, _ = _operator_with_orders(app, sandbox)
    sandbox.admin("PATCH", "config", json={"latency_ms": LATENCY_MS})
    since = sandbox.requests_log()[-1]["seq"]
    first = world["start_worker"]("t13-dead")
    run_id = _start_run(operator_id)
    wait_until(lambda: _item(run_id, operator_id).pages >= 2, 20, "two committed pages")
    horse = horse_of(first)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its scheduler
    horse.send_signal(signal.SIGKILL)
    first.wait(10)

    # What a surviving worker's maintenance does once the dead one's heartbeat lapsed.
    connection: redis.Redis = get_redis(app)
    queue = get_queue(QUEUE_SYNC)
    heartbeat_ttl = 30 + 60 + 60
    StartedJobRegistry(QUEUE_SYNC, connection=connection, serializer=JSONSerializer
                       ).cleanup(timestamp=time.time() + heartbeat_ttl)
    job = queue.fetch_job(sync_jobs.job_id(run_id, operator_id))
    assert job.get_status() == "scheduled" and job.retries_left == sync_jobs.SYNC_RETRY.max - 1
    # The dead worker's scheduler lock would lapse after 61 s.
    connection.delete(RQScheduler.get_locking_key(QUEUE_SYNC))

    world["start_worker"]("t13-fresh")
    item = _assert_applied_once(run_id, operator_id, sandbox, since)
    assert item.attempts == 2


def test_live_workers_take_over_a_killed_worker_on_their_own(world, sandbox):
    """Nothing simulated: a live worker's own maintenance (every 2 s here, 30 s by
    default) re-queues the dead worker's job once its heartbeat lapses (90 s) and takes
    over its scheduler lock once that lapses (61 s), which the retry's interval needs."""
    app = world["app"]
    operator_id, _ = _operator_with_orders(app, sandbox)
    sandbox.admin("PATCH", "config", json={"latency_ms": LATENCY_MS})
    since = sandbox.requests_log()[-1]["seq"]
    connection: redis.Redis = get_redis(app)
    first = world["start_worker"]("t13-dead")
    lock = RQScheduler.get_locking_key(QUEUE_SYNC)
    dead_scheduler = wait_until(lambda: connection.get(lock), 20,
                                "the first worker's scheduler lock")
    live = world["start_worker"]("t13-live", WORKER_MAINTENANCE_INTERVAL="2")
    run_id = _start_run(operator_id)
    wait_until(lambda: _item(run_id, operator_id).pages >= 2, 20, "two committed pages")
    job = get_queue(QUEUE_SYNC).fetch_job(sync_jobs.job_id(run_id, operator_id))
    assert job.worker_name.startswith("t13-dead"), job.worker_name
    horse = horse_of(first)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its scheduler
    horse.send_signal(signal.SIGKILL)
    first.wait(10)
    killed = time.monotonic()

    item = _assert_applied_once(run_id, operator_id, sandbox, since, within=150)
    took = time.monotonic() - killed
    print(f"\n[worker takeover] the live worker resumed the dead worker's job {took:.0f} s "
          "after the kill")
    assert item.attempts == 2 and live.poll() is None
    assert job.refresh() is None and job.worker_name.startswith("t13-live")
    assert connection.get(lock) not in (None, dead_scheduler)  # the live one schedules now
