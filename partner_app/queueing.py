"""Redis, RQ queues, retry policies and ``enqueue_after_commit``.

Jobs are enqueued only after the transaction that made their data commits: a job that
starts before its row exists would fail or, worse, act on stale state. They take ids,
never secrets, because RQ keeps job arguments in Redis in plain form.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from flask import Flask, current_app
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer
from sqlalchemy import event
from sqlalchemy.orm import Session

from partner_app import embedded_redis
from partner_app.settings import Settings

log = logging.getLogger(__name__)

QUEUE_DEFAULT = "default"
QUEUE_SYNC = "sync"
QUEUE_WEBHOOKS = "webhooks"
QUEUES = (QUEUE_WEBHOOKS, QUEUE_DEFAULT, QUEUE_SYNC)  # dequeue order: latency first

# Transient Stora failures: back off 10 s, 1 min, 5 min. Intervals need the scheduler.
STORA_RETRY = Retry(max=3, interval=[10, 60, 300])

_PENDING = "pending_jobs"


def redis_url(settings: Settings) -> str:
    """The configured Redis, or the embedded one (started on demand) in demo/test."""
    if settings.redis_url:
        return settings.redis_url
    return embedded_redis.ensure_running(settings.instance_path)


def get_redis(app: Flask | None = None) -> redis.Redis:
    app = app or current_app
    conn = app.extensions.get("redis")
    if conn is None:
        # Short timeouts: a Redis that hangs must not hold a webhook acknowledgement or a
        # request hostage (the sweepers re-queue what an enqueue missed). RQ workers raise
        # the socket timeout on their own connection for blocking dequeues.
        conn = redis.Redis.from_url(redis_url(app.extensions["settings"]),
                                    socket_connect_timeout=1, socket_timeout=3,
                                    health_check_interval=30)
        app.extensions["redis"] = conn
    return conn


def get_queue(name: str = QUEUE_DEFAULT, app: Flask | None = None) -> Queue:
    return Queue(name, connection=get_redis(app), serializer=JSONSerializer)


def existing_job_ids(connection: redis.Redis, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` name a job hash in Redis (one pipelined round trip)."""
    with connection.pipeline(transaction=False) as pipe:
        for one in ids:
            pipe.exists(Job.key_for(one))
        found = pipe.execute()
    return {one for one, hit in zip(ids, found, strict=True) if hit}


def delivery_of(job: Job, *, retry_max: int) -> tuple[int, bool]:
    """(delivery number of this run of ``job``, whether RQ would retry a raised
    exception). ``retry_max`` is the job's ``Retry.max`` (RQ does not store it).

    Each RQ re-delivery of one job id either spends a ``Retry`` attempt
    (``retries_left`` goes down) or follows a returned ``Retry`` (``number_of_retries``
    goes up), so the number strictly grows from one delivery to the next: a fence
    that tells a later delivery's writes from an earlier, presumed dead, one's.
    """
    left = job.retries_left if job.retries_left is not None else 0
    spent = max(0, retry_max - left) if job.retries_left is not None else 0
    return spent + (job.number_of_retries or 0), left > 0


def enqueue_after_commit(func: str, *args: Any, queue: str = QUEUE_DEFAULT,
                         **enqueue_kwargs: Any) -> None:
    """Enqueue ``func`` (a dotted path) once the current transaction commits.

    Dropped if it rolls back. ``args`` must be JSON-serialisable ids. If Redis is down
    at commit time the job is logged as lost; the sweepers that own each kind of work
    re-enqueue from the database, which is the durable record.
    """
    from partner_app.db import db

    db.session.info.setdefault(_PENDING, []).append((func, args, queue, enqueue_kwargs))


def _send_pending(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    for func, args, queue, kwargs in pending:
        try:
            job = get_queue(queue).enqueue(func, *args, **kwargs)
            log.info("job.enqueued", extra={"job_func": func, "job_id": job.id, "queue": queue})
        except Exception:
            log.exception("job.enqueue_failed", extra={"job_func": func, "queue": queue})


def _drop_pending(session: Session, previous_transaction) -> None:
    if previous_transaction.parent is None:  # the outermost transaction rolled back
        session.info.pop(_PENDING, None)


def init_app(app: Flask) -> None:
    if not event.contains(Session, "after_commit", _send_pending):
        event.listen(Session, "after_commit", _send_pending)
        event.listen(Session, "after_soft_rollback", _drop_pending)
