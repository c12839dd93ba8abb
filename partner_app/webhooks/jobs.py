"""Processing inbox events: the drain, the per-event job, and the sweeper.

Receipt asks for a *drain* rather than queueing a job per event: a Redis marker
(``SET NX`` with a short TTL) says "a drain is queued and has not started yet". The
delivery that sets it queues one drain job; deliveries that find it set queue nothing,
because that drain has not yet looked at the inbox. A drain deletes the marker before
its first claim, so any event committed after that point queues the next drain. With
several workers, each idle one picks up the next drain, and drains split the pending
events between them (``inbox.claim_batch``).

The inbox stays the source of truth: a lost marker or enqueue only delays processing
until the next delivery's drain or the minute sweeper, which queues the per-event job
``process_webhook_event`` for anything left pending. That job also carries handler
retries (with backoff) and replays.

Claims are fenced by the RQ job and delivery that hold them (``inbox.Holder``): when a
work-horse dies mid-handler, RQ delivers the same job again at once and the new
delivery takes over its predecessor's claims without waiting for the lease. Effects and
the ``processed`` mark commit in one transaction, and handlers are idempotent, so an
event is processed once in effect whatever dies when.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

from rq import Retry
from rq.job import Job, get_current_job

from partner_app import failpoints
from partner_app.db import db
from partner_app.logging import bind_operator
from partner_app.queueing import QUEUE_WEBHOOKS, delivery_of, get_queue, get_redis
from partner_app.webhooks import handlers, inbox
from partner_app.webhooks.models import InboxStatus

log = logging.getLogger(__name__)

PROCESS = "partner_app.webhooks.jobs.process_webhook_event"
PROCESS_RETRY = Retry(max=5, interval=[5, 30, 120, 600, 1800])
# A handler failure inside a drain: its own job after RETRY_FAILED_AFTER, then these.
RETRY_FAILED = Retry(max=4, interval=[30, 120, 600, 1800])
DRAIN = "partner_app.webhooks.jobs.drain_inbox"
# A drain whose work-horse died is delivered again at once (no interval: no scheduler
# round trip), and takes over the events it had claimed.
DRAIN_RETRY = Retry(max=3)
DRAIN_MARK = "webhooks:drain-queued"
# How long a "drain queued" marker may block further drain requests if the drain never
# starts (its enqueue failed after the marker was set, Redis lost the queue): the next
# delivery after that queues a drain again.
DRAIN_MARK_TTL = 10
# A process that asked for a drain less than this long ago skips asking again; every
# drain in turn keeps claiming for at least this long after it deleted the marker, so
# an event whose request was skipped is still seen (see request_drain).
DRAIN_COALESCE_SECONDS = 0.05
DRAIN_BATCH = 50
DRAIN_BUDGET_SECONDS = 20.0  # then hand over to a fresh drain (other queues get a turn)
RETRY_FAILED_AFTER = timedelta(seconds=5)
SWEEP_AFTER = timedelta(seconds=60)
_DONE = ("finished", "failed", "stopped", "canceled")


def job_id(event_row_id: int) -> str:
    return f"webhook-{event_row_id}"


_last_request = -1e9  # monotonic time this process last asked Redis for a drain


def request_drain() -> bool:
    """Make sure a drain will look at the inbox after this point (call after commit).

    True if this call queued one. Raises if Redis cannot be reached (the sweeper covers
    the event).

    Under load most calls find the marker set, so a process that asked less than
    DRAIN_COALESCE_SECONDS ago does not ask again. That is safe: the marker existed
    when it last asked, so a drain either is still queued (and will claim this event)
    or deleted the marker after that moment; and a drain keeps claiming until at least
    DRAIN_COALESCE_SECONDS after its delete, which is after this event's commit.
    """
    global _last_request
    asked_at = time.monotonic()
    if asked_at - _last_request < DRAIN_COALESCE_SECONDS:
        return False
    connection = get_redis()
    if not connection.set(DRAIN_MARK, b"1", nx=True, ex=DRAIN_MARK_TTL):
        _last_request = asked_at
        return False
    try:
        get_queue(QUEUE_WEBHOOKS).enqueue(
            DRAIN, job_id=f"webhook-drain-{uuid.uuid4().hex}", retry=DRAIN_RETRY,
            meta={"retry_max": DRAIN_RETRY.max}, result_ttl=300, failure_ttl=7 * 86400)
    except Exception:
        # Else the marker blocks requests until its TTL; the first error is the one raised.
        with contextlib.suppress(Exception):
            connection.delete(DRAIN_MARK)
        raise
    _last_request = asked_at
    return True


def _holder(job: Job | None) -> inbox.Holder:
    """This run's fence: its job id and delivery number (``queueing.delivery_of``)."""
    if job is None:
        return inbox.Holder()
    number, _ = delivery_of(job, retry_max=int((job.meta or {}).get("retry_max", 0)))
    return inbox.Holder(job.id, number)


def drain_inbox() -> dict:
    """Process pending events in batches until none is left (or the time budget is
    spent, then queue the next drain)."""
    holder = _holder(get_current_job())
    get_redis().delete(DRAIN_MARK)  # events committed from here on queue the next drain
    started = time.monotonic()
    counts = {"processed": 0, "ignored": 0, "failed": 0, "lost": 0}
    while True:
        batch = inbox.claim_batch(holder, now=datetime.now(UTC), limit=DRAIN_BATCH)
        db.session.commit()
        if not batch:
            # Events whose drain request was coalesced (request_drain) committed no
            # later than DRAIN_COALESCE_SECONDS after the marker's delete: look once
            # more after that before stopping.
            wait = started + DRAIN_COALESCE_SECONDS - time.monotonic()
            if wait <= 0:
                break
            time.sleep(wait)
            batch = inbox.claim_batch(holder, now=datetime.now(UTC), limit=DRAIN_BATCH)
            db.session.commit()
            if not batch:
                break
        for outcome in _apply_batch(batch, holder):
            counts[outcome] += 1
        if time.monotonic() - started > DRAIN_BUDGET_SECONDS:
            request_drain()
            break
    log.info("webhook.drained", extra=counts)
    return counts


def process_webhook_event(event_row_id: int, replay: bool = False) -> dict:
    """Apply one stored event through its handler, at most once in effect (the sweeper's,
    retries' and replays' path). Handler failures are kept on the row and re-raised for
    RQ's Retry."""
    holder = _holder(get_current_job())
    event = inbox.claim(event_row_id, now=datetime.now(UTC), holder=holder, replay=replay)
    if event is None:
        db.session.rollback()
        return {"skipped": True}
    db.session.commit()  # the claim is visible to every other worker from here
    return {"status": _apply(event, holder, retry_on_failure=False)}


def _handle(event: inbox.Claimed, now: datetime) -> str:
    """Run the event's handler (flush only); returns processed or ignored."""
    bind_operator(event.operator_id)
    handler = handlers.handler_for(event.event_type)
    if handler is None:
        return InboxStatus.IGNORED
    handler(json.loads(event.body)["event"], event.operator_id, now)
    return InboxStatus.PROCESSED


def _apply_batch(batch: list[inbox.Claimed], holder: inbox.Holder) -> list[str]:
    """Apply a batch in one transaction: one commit (one fsync) for all of it. If any
    handler raises or a claim was lost, nothing of the batch commits and each event is
    applied on its own, so one bad event costs only itself."""
    now = datetime.now(UTC)
    try:
        outcomes = {event.id: _handle(event, now) for event in batch}
        for status in (InboxStatus.PROCESSED, InboxStatus.IGNORED):
            inbox.settle([i for i, s in outcomes.items() if s == status], holder, status,
                         now=now)
        failpoints.reach("webhook_handler_before_commit")
        db.session.commit()
    except Exception:
        db.session.rollback()
        if len(batch) == 1:
            return [_apply(batch[0], holder, retry_on_failure=True)]
        log.info("webhook.batch_split", extra={"events": len(batch)})
        return [_apply(event, holder, retry_on_failure=True) for event in batch]
    return [str(outcome) for outcome in outcomes.values()]


def _apply(event: inbox.Claimed, holder: inbox.Holder, *, retry_on_failure: bool) -> str:
    """Run the handler of one claimed event and settle the claim; returns the outcome."""
    now = datetime.now(UTC)
    try:
        outcome = _handle(event, now)
        inbox.settle([event.id], holder, outcome, now=now)
        failpoints.reach("webhook_handler_before_commit")
        db.session.commit()
    except inbox.ClaimLost:
        db.session.rollback()
        log.warning("webhook.claim_lost", extra={"event_row": event.id})
        return "lost"
    except Exception as exc:
        db.session.rollback()
        _mark_failed(event.id, holder, exc)
        if not retry_on_failure:
            raise
        # The drain carries on with the other events; this one gets its own job, with
        # the backoff of RETRY_FAILED.
        try:
            get_queue(QUEUE_WEBHOOKS).enqueue_in(
                RETRY_FAILED_AFTER, PROCESS, event.id, job_id=job_id(event.id),
                retry=RETRY_FAILED, meta={"retry_max": RETRY_FAILED.max},
                failure_ttl=7 * 86400)
        except Exception:
            log.exception("job.enqueue_failed", extra={"job_func": PROCESS})
        return "failed"
    return str(outcome)


def _mark_failed(event_row_id: int, holder: inbox.Holder, exc: Exception) -> None:
    try:
        inbox.settle([event_row_id], holder, InboxStatus.FAILED, now=datetime.now(UTC),
                     error=f"{type(exc).__name__}: {exc}"[:500])
        db.session.commit()
    except inbox.ClaimLost:
        db.session.rollback()
    log.warning("webhook.failed", extra={"event_row": event_row_id,
                                         "error": type(exc).__name__})


def sweep_inbox(limit: int = 500) -> dict:
    """Cron: queue events whose enqueue was lost (Redis down at receipt, a crash between
    commit and enqueue) or whose processing job died. Deterministic job ids make a
    sweep that races the original enqueue queue it once."""
    from rq.exceptions import DuplicateJobError, NoSuchJobError

    ids = inbox.stale(now=datetime.now(UTC), pending_for=SWEEP_AFTER, limit=limit)
    queue = get_queue(QUEUE_WEBHOOKS)
    queued = 0
    for event_row_id in ids:
        for _ in range(2):
            try:
                queue.enqueue(PROCESS, event_row_id, job_id=job_id(event_row_id), unique=True,
                              retry=PROCESS_RETRY, meta={"retry_max": PROCESS_RETRY.max},
                              failure_ttl=7 * 86400)
                queued += 1
                break
            except DuplicateJobError:
                # Queued or running: leave it. Finished, failed or stopped: its hash only
                # blocks the id (for failure_ttl); the row is stale, so run it again.
                try:
                    old = Job.fetch(job_id(event_row_id), connection=queue.connection,
                                    serializer=queue.serializer)
                except NoSuchJobError:
                    continue  # it expired in between: the next try enqueues
                if old.get_status(refresh=True) not in _DONE:
                    break
                old.delete()
    if ids:
        log.info("webhook.sweep", extra={"stale": len(ids), "queued": queued})
    return {"stale": len(ids), "queued": queued}


def replay_event(event_row_id: int) -> None:
    """Queue a failed (or any) event again; used by the CLI and the dashboard."""
    get_queue(QUEUE_WEBHOOKS).enqueue(PROCESS, event_row_id, True,
                                      job_id=f"{job_id(event_row_id)}-replay-"
                                             f"{uuid.uuid4().hex[:12]}",
                                      retry=PROCESS_RETRY,
                                      meta={"retry_max": PROCESS_RETRY.max})
