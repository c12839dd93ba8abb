"""A webhook drain whose process dies mid-handler (T-13 for the inbox): the events it
had claimed are taken over by the next delivery of the same RQ job at once, not after
the five-minute claim lease, and each is processed once in effect.

Three signed deliveries are received in-process (the real receiver: one drain job
queued); a real ``partner-app worker webhooks`` runs the drain, which claims all three
and pauses in the first handler after its effects are flushed, before the commit
(failpoint ``webhook_handler_before_commit=sleep``). Then:

1. the work-horse is SIGKILLed: the worker sees it at once and RQ's ``Retry`` delivers
   the drain again; the new delivery takes over the three claims;
2. the whole worker (horse and scheduler too) is SIGKILLed: RQ's maintenance finds the
   job abandoned once its heartbeat lapses (run here with RQ's clock moved past it, as
   the sync test does) and a fresh worker's delivery takes the claims over, although
   the lease is still minutes from lapsing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from sqlalchemy import func, select

from partner_app.db import db
from partner_app.queueing import QUEUE_WEBHOOKS, get_queue, get_redis
from partner_app.sync.models import SyncedOrder
from partner_app.timeline.models import TimelineEvent
from partner_app.webhooks import inbox, jobs
from partner_app.webhooks.models import WebhookEvent
from tests.conftest import ROOT, _truncate_all, settings_env
from tests.e2e.conftest import horse_of, wait_until
from tests.integration.test_webhook_receiver import encode, envelope, make_hook, signed_headers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

EVENTS = 3
PAUSE_SECONDS = 2.0
PROMPT_SECONDS = 30  # far inside the claim lease (5 minutes)


@pytest.fixture
def world(app, backend_urls, sandbox, tmp_path) -> Iterator[dict]:
    _truncate_all(app)
    with app.app_context():
        get_redis(app).flushdb()
    env = {**os.environ, **settings_env(backend_urls, sandbox_url=sandbox.base_url),
           "PARTNER_FAILPOINTS": f"webhook_handler_before_commit=sleep:{PAUSE_SECONDS}"}
    procs: list[subprocess.Popen] = []
    logs = []

    def start_worker(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed at teardown)
        logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "partner_app.cli", "worker",
                                 QUEUE_WEBHOOKS, "--name", f"{name}-{os.getpid()}"],
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    with app.app_context():
        yield {"app": app, "start_worker": start_worker, "logs": tmp_path}
        db.session.remove()
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
    for log in logs:
        log.close()
    _truncate_all(app)


def _rows(operator_id: int) -> list[WebhookEvent]:
    db.session.expire_all()
    rows = list(db.session.scalars(select(WebhookEvent).where(
        WebhookEvent.operator_id == operator_id).order_by(WebhookEvent.id)))
    db.session.rollback()
    return rows


def _receive(app, hook) -> None:
    client = app.test_client()
    for _ in range(EVENTS):
        body = encode(envelope())
        resp = client.post(hook.path, data=body, headers=signed_headers(body, hook.secret))
        assert (resp.status_code, resp.get_json()["duplicate"]) == (200, False)
    assert get_queue(QUEUE_WEBHOOKS, app).count == 1  # one drain for the burst


def _all_claimed(operator_id: int) -> list[WebhookEvent] | None:
    rows = _rows(operator_id)
    return rows if rows and all(r.status == "processing" for r in rows) else None


def _assert_processed_once(operator_id: int, drain_job_id: str) -> None:
    rows = wait_until(lambda: (lambda rs: rs if all(r.status == "processed" for r in rs) else None)(
        _rows(operator_id)), PROMPT_SECONDS, "every event processed")
    # Claimed by the first delivery, taken over by the second: two attempts, no more.
    assert [(r.attempts, r.claimed_by, r.last_error) for r in rows] == \
        [(2, None, None)] * EVENTS
    for model in (SyncedOrder, TimelineEvent):
        assert db.session.scalar(select(func.count()).select_from(model).where(
            model.operator_id == operator_id)) == EVENTS
    db.session.rollback()
    job = get_queue(QUEUE_WEBHOOKS).fetch_job(drain_job_id)
    assert job.retries_left == jobs.DRAIN_RETRY.max - 1


def test_a_killed_work_horse_hands_its_claims_to_the_retry_at_once(world):
    app = world["app"]
    hook = make_hook(app)
    _receive(app, hook)
    worker = world["start_worker"]("wh-horse")

    claimed = wait_until(lambda: _all_claimed(hook.operator_id), 30, "the drain's claims")
    assert {r.claim_delivery for r in claimed} == {0}
    [drain_job_id] = {r.claimed_by for r in claimed}
    horse_of(worker).send_signal(signal.SIGKILL)  # inside the first handler's pause
    killed_at = time.monotonic()

    _assert_processed_once(hook.operator_id, drain_job_id)
    assert time.monotonic() - killed_at < PROMPT_SECONDS
    assert worker.poll() is None  # the worker survived its horse
    assert "Work-horse terminated unexpectedly" in \
        (world["logs"] / "wh-horse.log").read_text()


def test_a_killed_worker_s_claims_pass_to_the_next_delivery_before_the_lease_lapses(world):
    app = world["app"]
    hook = make_hook(app)
    _receive(app, hook)
    first = world["start_worker"]("wh-dead")
    claimed = wait_until(lambda: _all_claimed(hook.operator_id), 30, "the drain's claims")
    [drain_job_id] = {r.claimed_by for r in claimed}
    horse = horse_of(first)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its scheduler
    horse.send_signal(signal.SIGKILL)
    first.wait(10)

    # What a surviving worker's maintenance does once the dead one's heartbeat lapsed.
    connection = get_redis(app)
    StartedJobRegistry(QUEUE_WEBHOOKS, connection=connection, serializer=JSONSerializer
                       ).cleanup(timestamp=time.time() + 30 + 60 + 60)
    assert get_queue(QUEUE_WEBHOOKS).fetch_job(drain_job_id).get_status() == "queued"
    # The claims are seconds old: only the fence lets the next delivery take them.
    assert all(r.status == "processing" for r in _rows(hook.operator_id))
    assert inbox.CLAIM_LEASE.total_seconds() > 4 * PROMPT_SECONDS

    world["start_worker"]("wh-fresh")
    _assert_processed_once(hook.operator_id, drain_job_id)
