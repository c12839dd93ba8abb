"""Processing inbox events, and the sweeper that closes the outbox gap."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime, timedelta

from rq import Retry

from partner_app.db import db
from partner_app.logging import bind_operator
from partner_app.queueing import QUEUE_WEBHOOKS, enqueue_after_commit, get_queue
from partner_app.webhooks import handlers, inbox
from partner_app.webhooks.models import InboxStatus, WebhookEvent

log = logging.getLogger(__name__)

PROCESS = "partner_app.webhooks.jobs.process_webhook_event"
PROCESS_RETRY = Retry(max=5, interval=[5, 30, 120, 600, 1800])
SWEEP_AFTER = timedelta(seconds=60)
_DONE = ("finished", "failed", "stopped", "canceled")


def job_id(event_row_id: int) -> str:
    return f"webhook-{event_row_id}"


def enqueue_processing(event_row_id: int) -> None:
    """Queue processing once the inbox row is committed."""
    enqueue_after_commit(PROCESS, event_row_id, queue=QUEUE_WEBHOOKS,
                         job_id=job_id(event_row_id), retry=PROCESS_RETRY,
                         failure_ttl=7 * 86400)


def process_webhook_event(event_row_id: int, replay: bool = False) -> dict:
    """Apply one stored event through its handler, at most once in effect.

    The claim makes concurrent or repeated deliveries of this job harmless; handler
    effects are idempotent, so a job that dies after applying them and runs again
    changes nothing. Handler failures are kept on the row and re-raised for RQ's Retry.
    """
    now = datetime.now(UTC)
    event = inbox.claim(event_row_id, now=now, replay=replay)
    if event is None:
        db.session.rollback()
        return {"skipped": True}
    db.session.commit()  # the claim is visible to every other worker from here
    bind_operator(event.operator_id)
    handler = handlers.handler_for(event.event_type)
    if handler is None:
        event.status = InboxStatus.IGNORED
        event.processed_at = now
        db.session.commit()
        return {"status": "ignored"}
    try:
        envelope = json.loads(event.body)["event"]
        outcome = handler(envelope, event.operator_id, now)
    except Exception as exc:
        db.session.rollback()
        _mark_failed(event_row_id, exc)
        raise
    event = db.session.get(WebhookEvent, event_row_id)
    event.status = InboxStatus.PROCESSED
    event.processed_at = now
    event.last_error = None
    db.session.commit()
    log.info("webhook.processed", extra={"event_row": event_row_id,
                                         "type": event.event_type, "outcome": outcome})
    return {"status": "processed", "outcome": outcome}


def _mark_failed(event_row_id: int, exc: Exception) -> None:
    event = db.session.get(WebhookEvent, event_row_id)
    event.status = InboxStatus.FAILED
    event.claimed_at = None
    event.last_error = f"{type(exc).__name__}: {exc}"[:500]
    db.session.commit()
    log.warning("webhook.failed", extra={"event_row": event_row_id,
                                         "error": type(exc).__name__})


def sweep_inbox(limit: int = 500) -> dict:
    """Cron: queue events whose enqueue was lost (Redis down at receipt, a crash between
    commit and enqueue) or whose processing job died. Deterministic job ids make a
    sweep that races the original enqueue queue it once."""
    from rq.exceptions import DuplicateJobError, NoSuchJobError
    from rq.job import Job

    ids = inbox.stale(now=datetime.now(UTC), pending_for=SWEEP_AFTER, limit=limit)
    queue = get_queue(QUEUE_WEBHOOKS)
    queued = 0
    for event_row_id in ids:
        for _ in range(2):
            try:
                queue.enqueue(PROCESS, event_row_id, job_id=job_id(event_row_id), unique=True,
                              retry=PROCESS_RETRY, failure_ttl=7 * 86400)
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
                                      retry=PROCESS_RETRY)
