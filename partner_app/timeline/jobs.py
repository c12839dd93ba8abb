"""The job that delivers one timeline event. Takes an id; safe to run any number of times."""

from __future__ import annotations

import logging
import math
import random
from typing import Any

from flask import current_app
from rq import RateLimit, Retry
from rq.job import get_current_job
from sqlalchemy import update

from partner_app.connections.credentials import CredentialError
from partner_app.connections.jobs import client_for
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db
from partner_app.queueing import QUEUE_DEFAULT, enqueue_after_commit, get_redis
from partner_app.stora.errors import RateLimited, RateLimitWait
from partner_app.timeline import services
from partner_app.timeline.models import EventStatus, TimelineEvent

log = logging.getLogger(__name__)

RECORD_EVENT = "partner_app.timeline.jobs.record_event"
TIMELINE_RETRY = Retry(max=5, interval=[10, 60, 300, 900, 3600])
WAIT_MAX = 1000  # re-schedules for rate-limit waits, before giving up


def job_id(event_id: int) -> str:
    return f"timeline-{event_id}"


def enqueue_after_commit_for(event_id: int, operator_id: int) -> None:
    """Queue delivery once the transaction that created the event commits.

    The job shares the operator's concurrency key with every other job that calls
    Stora for that operator, so it never overlaps the operator's sync.
    """
    enqueue_after_commit(RECORD_EVENT, event_id, queue=QUEUE_DEFAULT, job_id=job_id(event_id),
                         retry=TIMELINE_RETRY, failure_ttl=7 * 86400,
                         rate_limit=RateLimit(key=f"operator:{operator_id}", concurrency=1))


def source_name() -> str:
    settings = current_app.extensions["settings"]
    return getattr(settings, "stora_timeline_source", None) or services.DEFAULT_SOURCE_NAME


def record_event(event_id: int) -> dict[str, Any]:
    """Deliver a pending event. Transient failures raise (RQ retries them); a rate-limit
    wait re-schedules the job without spending a retry; permanent ones are recorded."""
    event = db.session.get(TimelineEvent, event_id)
    if event is None or event.status != EventStatus.PENDING:
        return {"status": event.status if event else "missing"}
    operator = db.session.get(Operator, event.operator_id)
    if operator is None or operator.status not in (OperatorStatus.ACTIVE,
                                                   OperatorStatus.DEGRADED):
        return _fail(event_id, f"operator is {operator.status if operator else 'gone'}")
    client = client_for(event.operator_id)
    try:
        event = services.deliver(event_id, client, source_name=source_name(),
                                 commit=db.session.commit, cache=get_redis())
    except (RateLimitWait, RateLimited) as exc:
        db.session.rollback()
        job = get_current_job()
        if job is None or (job.number_of_retries or 0) >= WAIT_MAX:
            raise
        return Retry(max=WAIT_MAX, interval=math.ceil(exc.retry_after or 1) +
                     random.randint(0, 2))  # type: ignore[return-value]
    except CredentialError as exc:
        db.session.rollback()
        if getattr(exc, "retryable", False):
            raise
        return _fail(event_id, type(exc).__name__)
    return {"status": event.status, "stora_event_id": event.stora_event_id}


def _fail(event_id: int, reason: str) -> dict[str, Any]:
    db.session.execute(update(TimelineEvent)
                       .where(TimelineEvent.id == event_id,
                              TimelineEvent.status == EventStatus.PENDING)
                       .values(status=EventStatus.FAILED, last_error=reason[:500])
                       .execution_options(synchronize_session=False))
    db.session.commit()
    log.warning("timeline.not_delivered", extra={"event_id": event_id, "reason": reason})
    return {"status": EventStatus.FAILED}
