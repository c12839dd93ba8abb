"""Jobs that keep webhook subscriptions in their desired state.

* ``reconcile_webhooks(operator_id)``: one operator (queued after a connect commits);
* ``reconcile_all_webhooks()``: cron; queues the former for every connected operator and
  closes the subscriptions of operators that are no longer connected;
* ``rotate_webhook_secret(operator_id)``: a new endpoint and secret, with overlap.

They take ids, are safe to run again (see ``subscriptions``) and run on the webhooks
queue. Transient failures raise for RQ's ``Retry``; a rate-limit wait re-schedules the
job without spending a retry; permanent failures are recorded on the subscription
concerned.

They deliberately do not carry the operator's RQ concurrency key (``operator:{id}``,
which sync and timeline jobs share): RQ counts a job against the key from the moment it
is queued, so a reconcile job waiting on the webhooks queue would hold back the
operator's sync and timeline jobs on the other queues. Two reconcilers of one operator
are made safe in the database instead (the operator's row lock around inserting a
subscription, compare-and-swap on every change, one idempotency key per create), and
the shared Redis limiter keeps their Stora calls within the operator's budget.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from rq import Queue, Retry
from rq.job import Job, get_current_job
from sqlalchemy import select

from partner_app.connections.credentials import CredentialError
from partner_app.connections.models import Operator
from partner_app.db import db, utcnow
from partner_app.queueing import (
    QUEUE_WEBHOOKS,
    STORA_RETRY,
    enqueue_after_commit,
    existing_job_ids,
    get_queue,
)
from partner_app.stora.errors import RateLimited, RateLimitWait, StoraError
from partner_app.sync.jobs import _reschedule
from partner_app.webhooks import subscriptions

log = logging.getLogger(__name__)

RECONCILE = "partner_app.webhooks.reconcile_jobs.reconcile_webhooks"
ROTATE = "partner_app.webhooks.reconcile_jobs.rotate_webhook_secret"
RESULT_TTL = 3600
FAILURE_TTL = 7 * 86400
ENQUEUE_BATCH = 500
# Cron job ids carry the minute they were queued in: a second scheduler that fires in the
# same minute (a leader failover) finds the id taken, and the next round gets new ones.
BUCKET_SECONDS = 60


def connect_job_id(operator_id: int, credential_version: int) -> str:
    return f"webhooks-connect-{operator_id}-{credential_version}"


def cron_job_id(operator_id: int, bucket: int) -> str:
    return f"webhooks-reconcile-{operator_id}-{bucket}"


def enqueue_reconcile_after_commit(operator_id: int, *, job_id: str) -> None:
    """Queue ``reconcile_webhooks`` once the current transaction commits."""
    enqueue_after_commit(RECONCILE, operator_id, queue=QUEUE_WEBHOOKS, job_id=job_id,
                         retry=STORA_RETRY, result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL)


def enqueue_rotation(operator_id: int) -> Job:
    """Queue ``rotate_webhook_secret`` now (a staff action; each call rotates once)."""
    return get_queue(QUEUE_WEBHOOKS).enqueue(
        ROTATE, operator_id, job_id=f"webhooks-rotate-{operator_id}-{int(utcnow().timestamp())}",
        retry=STORA_RETRY, result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL)


def reconcile_webhooks(operator_id: int) -> dict[str, Any] | Retry:
    """Reconcile one operator's subscriptions (``subscriptions.reconcile_operator``)."""
    return _run(operator_id, lambda: subscriptions.reconcile_operator(operator_id))


def rotate_webhook_secret(operator_id: int) -> dict[str, Any] | Retry:
    """Rotate one operator's webhook secret (``subscriptions.rotate_secret``)."""
    return _run(operator_id, lambda: subscriptions.rotate_secret(operator_id))


def _run(operator_id: int, work: Callable[[], dict[str, Any]]) -> dict[str, Any] | Retry:
    try:
        return work()
    except (RateLimitWait, RateLimited) as exc:
        db.session.rollback()
        wait = (exc.retry_after or 1.0) + random.uniform(0, 2)  # jitter
        retry = _reschedule(get_current_job(), wait)
        if retry is None:
            raise
        log.info("webhooks.rate_limited", extra={"operator_id": operator_id,
                                                 "wait_seconds": round(wait, 1)})
        return retry
    except (StoraError, CredentialError) as exc:
        db.session.rollback()
        if getattr(exc, "retryable", False):
            raise
        # Permanent and not about one subscription (e.g. a missing scope on the list):
        # retrying cannot help; the next cron round tries again.
        log.warning("webhooks.reconcile_failed", extra={"operator_id": operator_id,
                                                        "error": type(exc).__name__})
        return {"operator_id": operator_id, "error": subscriptions.describe_error(exc)}


def _enqueue_batch(operator_ids: Sequence[int], bucket: int) -> int:
    """Queue the batch's jobs not queued yet this round, in one pipelined round trip."""
    queue = get_queue(QUEUE_WEBHOOKS)
    ids = {operator_id: cron_job_id(operator_id, bucket) for operator_id in operator_ids}
    present = existing_job_ids(queue.connection, list(ids.values()))
    todo = [Queue.prepare_data(RECONCILE, args=(operator_id,), job_id=one,
                               result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL,
                               retry=STORA_RETRY)
            for operator_id, one in ids.items() if one not in present]
    if todo:
        queue.enqueue_many(todo)
    return len(todo)


def reconcile_all_webhooks() -> dict[str, int]:
    """Cron: close the subscriptions of operators no longer connected (no Stora call:
    a disconnect disabled their endpoints), then queue a reconcile for every connected
    operator."""
    closed = subscriptions.close_disconnected()
    operator_ids = db.session.scalars(
        select(Operator.id).where(Operator.status.in_(subscriptions.CONNECTED))
        .order_by(Operator.id)).all()
    db.session.commit()
    bucket = int(utcnow().timestamp() // BUCKET_SECONDS)
    queued = sum(_enqueue_batch(operator_ids[start:start + ENQUEUE_BATCH], bucket)
                 for start in range(0, len(operator_ids), ENQUEUE_BATCH))
    log.info("webhooks.reconcile_all", extra={"operators": len(operator_ids),
                                              "queued": queued, "closed": closed})
    return {"operators": len(operator_ids), "queued": queued, "closed": closed}
