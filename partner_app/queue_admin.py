"""What RQ holds on our queues, and the two repairs staff may make to a failed job.

Reads never clean RQ's registries up (``cleanup=False``): looking at the jobs page must
not move jobs around. Job arguments are shown only where they are operator ids
(:data:`OPERATOR_ARGUMENT`); everything else a job carries stays in Redis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

import redis as redis_lib
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from partner_app import audit
from partner_app.queueing import QUEUES

#: For each job function taking an operator id, the position of that argument.
OPERATOR_ARGUMENT = {
    "partner_app.connections.jobs.first_api_call": 0,
    "partner_app.connections.jobs.refresh_operator_token": 0,
    "partner_app.sync.jobs.sync_operator": 1,
    "partner_app.webhooks.reconcile_jobs.reconcile_webhooks": 0,
    "partner_app.webhooks.reconcile_jobs.rotate_webhook_secret": 0,
}

# RQ job ids are ours (no ':') or RQ's uuid4 hex; anything else is not a job id.
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class JobNotFound(Exception):
    """No failed job with that id on that queue (already retried, deleted or expired)."""


@dataclass(frozen=True)
class QueueCounts:
    name: str
    queued: int
    running: int
    failed: int
    scheduled: int
    deferred: int


@dataclass(frozen=True)
class JobSummary:
    id: str
    queue: str
    function: str
    operator_ids: tuple[int, ...] = ()
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None  # the traceback RQ kept
    extra: dict = field(default_factory=dict)

    @property
    def error_summary(self) -> str:
        """The traceback's last line: the exception and its message."""
        lines = [line for line in (self.error or "").strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


def _queue(name: str, redis: redis_lib.Redis) -> Queue:
    if name not in QUEUES:
        raise JobNotFound(f"no queue named {name!r}")
    return Queue(name, connection=redis, serializer=JSONSerializer)


def queue_counts(redis: redis_lib.Redis) -> list[QueueCounts]:
    """Per queue: waiting, running, failed, scheduled (retry back-off) and deferred jobs.

    One pipelined round trip of LLEN/ZCARD. RQ's ``count`` properties would clean each
    registry up first: writes, and a round trip each, on every look at the page.
    """
    queues = [_queue(name, redis) for name in QUEUES]
    with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue.key)
            for registry in (queue.started_job_registry, queue.failed_job_registry,
                             queue.scheduled_job_registry, queue.deferred_job_registry):
                pipe.zcard(registry.key)
        values = pipe.execute()
    return [QueueCounts(queue.name, *values[i * 5:(i + 1) * 5])
            for i, queue in enumerate(queues)]


def _operator_ids(job: Job) -> tuple[int, ...]:
    position = OPERATOR_ARGUMENT.get(job.func_name)
    if position is None:
        return ()
    try:
        value = job.args[position]
    except (IndexError, TypeError, ValueError):
        return ()
    return (value,) if isinstance(value, int) else ()


def _summaries(ids: list[str], queue: str, redis: redis_lib.Redis, *,
               with_error: bool) -> list[JobSummary]:
    jobs = Job.fetch_many(ids, connection=redis, serializer=JSONSerializer)
    summaries = []
    for job_id, job in zip(ids, jobs, strict=True):
        if job is None:  # expired between the registry read and the fetch
            continue
        try:
            function = job.func_name
        except Exception:  # an undecodable payload still shows up, unnamed
            function = "?"
        summaries.append(JobSummary(
            id=job_id, queue=queue, function=function, operator_ids=_operator_ids(job),
            enqueued_at=job.enqueued_at, started_at=job.started_at, ended_at=job.ended_at,
            error=_error_of(job) if with_error else None))
    return summaries


def _error_of(job: Job) -> str | None:
    """The traceback of the job's latest failed execution, if RQ kept one."""
    result = job.latest_result()
    if result is None or result.type != Result.Type.FAILED:
        return None
    return result.exc_string


def running_jobs(redis: redis_lib.Redis, *, limit: int = 20) -> list[JobSummary]:
    """Jobs a worker is executing now, newest first, up to ``limit`` per queue."""
    found: list[JobSummary] = []
    for name in QUEUES:
        registry = StartedJobRegistry(name, connection=redis, serializer=JSONSerializer)
        ids = list(dict.fromkeys(registry.get_job_ids(0, limit - 1, desc=True, cleanup=False)))
        found += _summaries(ids, name, redis, with_error=False)
    return found


def failed_jobs(redis: redis_lib.Redis, *, limit: int = 20) -> list[JobSummary]:
    """Failed jobs with their tracebacks, most recent failure first, ``limit`` per queue."""
    found: list[JobSummary] = []
    for name in QUEUES:
        registry = FailedJobRegistry(name, connection=redis, serializer=JSONSerializer)
        ids = registry.get_job_ids(0, limit - 1, desc=True, cleanup=False)
        found += _summaries(ids, name, redis, with_error=True)
    return found


def _failed_job(redis: redis_lib.Redis, queue: str, job_id: str) -> tuple[FailedJobRegistry, Job]:
    if not _JOB_ID_RE.match(job_id):
        raise JobNotFound("not a job id")
    registry = _queue(queue, redis).failed_job_registry
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    except NoSuchJobError:
        raise JobNotFound(f"job {job_id} no longer exists") from None
    if job.origin != queue or redis.zscore(registry.key, job_id) is None:
        raise JobNotFound(f"job {job_id} is not a failed job on {queue}")
    return registry, job


def requeue_failed(redis: redis_lib.Redis, queue: str, job_id: str, *, actor: str,
                   by_staff_id: int) -> Job:
    """Put a failed job back on its queue (audited; the caller commits the audit row).

    Raises JobNotFound. Jobs are idempotent, so running one again is safe.
    """
    registry, job = _failed_job(redis, queue, job_id)
    try:
        registry.requeue(job)
    except InvalidJobOperation:
        raise JobNotFound(f"job {job_id} is not a failed job on {queue}") from None
    audit.record("job.requeued", actor_type="staff", actor=actor, by_staff_id=by_staff_id,
                 queue=queue, job_id=job_id, function=job.func_name,
                 operator_ids=list(_operator_ids(job)))
    return job


def delete_failed(redis: redis_lib.Redis, queue: str, job_id: str, *, actor: str,
                  by_staff_id: int) -> None:
    """Forget a failed job for good (audited; the caller commits the audit row)."""
    _registry, job = _failed_job(redis, queue, job_id)
    function, operator_ids = job.func_name, list(_operator_ids(job))
    job.delete()
    audit.record("job.deleted", actor_type="staff", actor=actor, by_staff_id=by_staff_id,
                 queue=queue, job_id=job_id, function=function, operator_ids=operator_ids)
