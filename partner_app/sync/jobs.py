"""Sync jobs: the fan-out parent, the per-operator job, the cron entry and the sweeper.

Jobs take ids, commit their own transactions and are safe to deliver more than once:

* the parent enqueues one job per operator under the deterministic id
  ``sync-{run}-{operator}``, skipping items already enqueued (database marker) and job
  ids already in Redis (a crash between the Redis write and the marker's commit);
* the per-operator job claims its item first (``services.claim_item``), so a duplicate
  delivery finds nothing to do, and a re-delivery after a crash takes over from the
  dead delivery and resumes from the operator's cursor.

Per-operator jobs carry RQ's ``RateLimit(key="operator:{id}", concurrency=1)``: one
operator never has two Stora-calling jobs in flight, whichever run they belong to.
``Queue.enqueue_many`` cannot carry a rate limit (``EnqueueData`` has no field for it)
and ``Queue.enqueue_job`` refuses a rate-limited job with a pipeline, so the fan-out
writes what RQ's own pipelined path for rate-limited jobs writes
(``Queue._enqueue_rate_limited_job``, used by ``ScheduledJobRegistry`` promotion and
``StartedJobRegistry.requeue`` in RQ 3.0), in Lua calls streamed on one connection:
one wait per batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import zlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from redis.exceptions import LockError
from rq import Queue, RateLimit, Retry
from rq.job import Job, JobStatus, get_current_job
from rq.rate_limit import RateLimitRegistry
from sqlalchemy import select, text

from partner_app.connections.credentials import CredentialError, NeedsReauth, NotConnected
from partner_app.connections.jobs import client_for
from partner_app.connections.models import Operator
from partner_app.db import db, utcnow
from partner_app.queueing import (
    QUEUE_SYNC,
    delivery_of,
    existing_job_ids,
    get_queue,
    get_redis,
)
from partner_app.stora.errors import RateLimited, RateLimitWait, StoraError
from partner_app.sync import bulk_enqueue, orders, services
from partner_app.sync.models import ItemStatus, SyncRunItem

log = logging.getLogger(__name__)

SYNC_OPERATOR = "partner_app.sync.jobs.sync_operator"
# Transient Stora failures: the first retry comes soon (a dead worker's job should not
# wait long), later ones back off.
SYNC_RETRY = Retry(max=3, interval=[5, 60, 300])
FAN_OUT_BATCH = 500
ENQUEUE_CHUNK = 100  # jobs per script call
JOB_TIMEOUT = 900
SLICE_SECONDS = 300  # a job hands its slot back after this long; the next slice resumes
RESCHEDULE_MAX = 10_000  # deliveries for rate-limit waits and slices, before giving up
RESULT_TTL = 3600
FAILURE_TTL = 7 * 86400
ALIVE_JOB_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED,
                                JobStatus.DEFERRED, JobStatus.RATE_LIMITED})
SWEEP_GRACE_SECONDS = 120
SWEEP_BATCH = 1000
TIMELINE_TEMPLATE = "Synced orders"


def job_id(run_id: int, operator_id: int) -> str:
    # RQ 3 accepts only letters, digits, "_" and "-" in job ids.
    return f"sync-{run_id}-{operator_id}"


def operator_rate_limit(operator_id: int) -> RateLimit:
    return RateLimit(key=f"operator:{operator_id}", concurrency=1)


# -- fan-out -------------------------------------------------------------------------------
def enqueue_operator_jobs(queue: Queue, run_id: int, operator_ids: Sequence[int]) -> list[str]:
    """Enqueue one rate-limited job per operator whose job id does not exist yet;
    returns the ids it wrote (re-enqueueing a live id would put it on the queue twice).

    Per job this writes what ``Queue._enqueue_rate_limited_job`` writes (the rate-limit
    key's config, the job hash as ``rate_limited``, its place in the key's waiting set,
    then RQ's promotion script), but the job hash comes from ``_JobTemplate``: building
    a ``Job`` and serialising it took most of the fan-out's CPU, and every job of a run
    differs only in its operator. With a checked template the writes run in Lua, one
    call per ``ENQUEUE_CHUNK`` jobs (``bulk_enqueue``); otherwise in one pipeline.
    """
    if not operator_ids:
        return []
    template = _JobTemplate(queue, run_id)
    template.mapping(operator_ids[0])  # checks the template against RQ's own job
    prefix = bulk_enqueue.key_layout(queue.connection)
    if template.trusted and prefix is not None:
        # Built chunk by chunk as write_jobs sends them: Redis runs one while the next
        # is built here.
        chunks = ([template.per_job(operator_id)
                   for operator_id in operator_ids[start:start + ENQUEUE_CHUNK]]
                  for start in range(0, len(operator_ids), ENQUEUE_CHUNK))
        skipped = bulk_enqueue.write_jobs(
            queue.connection, queue, template.base, chunks,
            concurrency=int(template.base["rate_limit_concurrency"]), rate_limit_prefix=prefix)
        return [one for one in (job_id(run_id, operator_id) for operator_id in operator_ids)
                if one not in skipped]
    present = existing_job_ids(queue.connection, [job_id(run_id, op) for op in operator_ids])
    ids = []
    # Not a MULTI/EXEC transaction: each job's writes are independent, and a batch cut
    # short leaves jobs either not written (the fan-out's next pass writes them) or
    # waiting in the rate-limit set (RQ's maintenance promotes them).
    with queue.connection.pipeline(transaction=False) as pipe:
        for operator_id in operator_ids:
            if job_id(run_id, operator_id) in present:
                continue
            one, mapping = template.mapping(operator_id)
            registry = RateLimitRegistry(key=mapping["rate_limit_key"],
                                         connection=queue.connection)
            registry.register(mapping["rate_limit_concurrency"], pipe)
            pipe.hset(Job.key_for(one), mapping=mapping)
            registry.add_to_rate_limited(one, pipe)
            registry.acquire_and_enqueue(mapping["rate_limit_concurrency"], pipeline=pipe)
            ids.append(one)
        pipe.sadd(queue.redis_queues_keys, queue.key)
        pipe.execute()
    return ids


def _rq_job(queue: Queue, run_id: int, operator_id: int) -> Job:
    """The job RQ itself would create for one operator, ready to be saved as waiting
    for its rate-limit slot (as ``Queue._enqueue_rate_limited_job`` prepares it)."""
    job = queue.create_job(
        SYNC_OPERATOR, args=(run_id, operator_id), job_id=job_id(run_id, operator_id),
        timeout=JOB_TIMEOUT, result_ttl=RESULT_TTL, failure_ttl=FAILURE_TTL,
        retry=SYNC_RETRY, meta={"retry_max": SYNC_RETRY.max},
        rate_limit=operator_rate_limit(operator_id))
    job.origin = queue.name
    job._status = JobStatus.RATE_LIMITED
    return job


class _JobTemplate:
    """Job hashes for one run's operator jobs from one RQ-built job.

    Only the arguments (``data``, ``description``) and the rate-limit key depend on the
    operator. The first mapping is checked against the hash RQ builds for the same
    operator; if they differ in anything but ``created_at`` (an RQ upgrade changed its
    format), every job is built by RQ instead.
    """

    def __init__(self, queue: Queue, run_id: int):
        self.queue = queue
        self.run_id = run_id
        self.job: Job | None = None
        self.base: dict[str, Any] = {}
        self.checked = False
        self.trusted = False

    def per_job(self, operator_id: int) -> tuple[str, bytes, str, str]:
        """What differs per operator: (job id, data, description, rate-limit key).
        Only for a checked, trusted template."""
        assert self.job is not None and self.trusted
        return self._varying(operator_id)

    def _varying(self, operator_id: int) -> tuple[str, bytes, str, str]:
        job = self.job
        job.args = (self.run_id, operator_id)
        return (job_id(self.run_id, operator_id), zlib.compress(job.data),
                job.get_call_string(), operator_rate_limit(operator_id).key)

    def mapping(self, operator_id: int) -> tuple[str, dict[str, Any]]:
        one = job_id(self.run_id, operator_id)
        if self.job is None:
            self.job = _rq_job(self.queue, self.run_id, operator_id)
            self.base = self.job.to_dict()
        if self.checked and not self.trusted:
            return one, _rq_job(self.queue, self.run_id, operator_id).to_dict()
        _, data, description, limit = self._varying(operator_id)
        mapping = {**self.base, "data": data, "description": description,
                   "rate_limit_key": limit}
        if not self.checked:
            self.checked = True
            built = _rq_job(self.queue, self.run_id, operator_id).to_dict()
            self.trusted = {**built, "created_at": None} == {**mapping, "created_at": None}
            if not self.trusted:
                log.warning("sync.job_template_mismatch", extra={"run_id": self.run_id})
                return one, built
        return one, mapping


def fan_out_pending(run_id: int, *, batch_size: int = FAN_OUT_BATCH) -> int:
    """Enqueue the jobs of every queued item not yet enqueued; returns how many."""
    queue = get_queue(QUEUE_SYNC)
    enqueued = 0
    while True:
        batch = services.pending_fanout(run_id, limit=batch_size)
        db.session.commit()
        if not batch:
            return enqueued
        written = enqueue_operator_jobs(queue, run_id, [operator_id for _, operator_id in batch])
        services.mark_enqueued([item_id for item_id, _ in batch], now=utcnow())
        db.session.commit()
        enqueued += len(written)


def fan_out(run_id: int) -> dict[str, Any]:
    """The run's parent job: enqueue every operator's job, in pipelined batches."""
    started = time.monotonic()
    enqueued = fan_out_pending(run_id)
    services.mark_fanned_out(run_id, now=utcnow())
    db.session.commit()
    log.info("sync.fanned_out", extra={"run_id": run_id, "enqueued": enqueued,
                                       "seconds": round(time.monotonic() - started, 3)})
    return {"enqueued": enqueued}


# -- one operator ----------------------------------------------------------------------------
def _delivery(job: Job | None) -> tuple[int, bool]:
    """(delivery number of this job run, whether RQ would retry a raised exception)."""
    if job is None:
        return 0, False
    return delivery_of(job, retry_max=int((job.meta or {}).get("retry_max", SYNC_RETRY.max)))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StoraError):
        parts = [type(exc).__name__, str(exc.status or ""), exc.code or ""]
        if exc.request_id:
            parts.append(f"request {exc.request_id}")
        return " ".join(part for part in parts if part)[:500]
    return type(exc).__name__


def _reschedule(job: Job | None, seconds: float) -> Retry | None:
    """A returned ``Retry`` re-delivers this job id after ``seconds`` without spending an
    attempt of its exception ``Retry``; None once it has been re-scheduled too often."""
    if job is None or (job.number_of_retries or 0) >= RESCHEDULE_MAX:
        return None
    return Retry(max=RESCHEDULE_MAX, interval=max(0, math.ceil(seconds)))


def sync_operator(run_id: int, operator_id: int) -> dict[str, Any] | Retry:
    """Sync one operator for one run (see the module docstring for the guarantees)."""
    job = get_current_job()
    attempt, will_retry = _delivery(job)
    claim = services.claim_item(run_id, operator_id, attempt=attempt, now=utcnow())
    if claim is None:
        db.session.rollback()
        log.info("sync.not_claimed", extra={"run_id": run_id, "operator_id": operator_id,
                                            "attempt": attempt})
        return {"claimed": False}
    db.session.commit()
    operator = db.session.get(Operator, operator_id)
    if operator is None or operator.status not in services.SYNCABLE_STATUSES:
        return _finish(claim, ItemStatus.SKIPPED,
                       error=f"operator is {operator.status if operator else 'gone'}")
    try:
        result = _run(claim)
    except services.ClaimLost:
        db.session.rollback()
        log.warning("sync.superseded", extra={"run_id": run_id, "operator_id": operator_id})
        return {"superseded": True}
    except (NeedsReauth, NotConnected) as exc:
        db.session.rollback()
        return _finish(claim, ItemStatus.SKIPPED, error=type(exc).__name__)
    except (RateLimitWait, RateLimited) as exc:
        db.session.rollback()
        wait = (exc.retry_after or 1.0) + random.uniform(0, 2)  # jitter
        retry = _reschedule(job, wait)
        if retry is None:
            return _finish(claim, ItemStatus.FAILED, error=f"gave up waiting: {_describe(exc)}")
        _release(claim, note=f"waiting {math.ceil(wait)}s: {_describe(exc)}")
        log.info("sync.rate_limited", extra={"run_id": run_id, "operator_id": operator_id,
                                             "wait_seconds": round(wait, 1)})
        return retry
    except Exception as exc:
        db.session.rollback()
        gone = _unsyncable_status(operator_id)
        if gone is not None:
            # E.g. a 401 whose refresh found the grant revoked: the operator is now
            # needs_reauth, which is a reason to skip, not a failure of the sync.
            return _finish(claim, ItemStatus.SKIPPED,
                           error=f"operator became {gone}: {_describe(exc)}")
        permanent = isinstance(exc, StoraError | CredentialError) and \
            not getattr(exc, "retryable", False)
        if permanent:
            return _finish(claim, ItemStatus.FAILED, error=_describe(exc))
        if will_retry:
            _release(claim, note=f"retrying after {_describe(exc)}")
        else:
            _finish(claim, ItemStatus.FAILED, error=f"retries exhausted: {_describe(exc)}")
        raise
    if not result.complete:
        # The slice is over: hand the operator's slot to the next job in line and come
        # back at the end of the queue, resuming from the cursor.
        retry = _reschedule(job, 0)
        if retry is None:
            return _finish(claim, ItemStatus.FAILED, error="did not finish within its slices")
        _release(claim, note=None)
        return retry
    return _finish(claim, ItemStatus.SUCCEEDED)


def _unsyncable_status(operator_id: int) -> str | None:
    status = db.session.scalar(select(Operator.status).where(Operator.id == operator_id))
    db.session.rollback()
    return None if status in services.SYNCABLE_STATUSES else str(status)


def _run(claim: services.Claim) -> orders.BackfillResult:
    client = client_for(claim.operator_id)

    relaxed = db.session.get_bind().dialect.name == "postgresql"

    def checkpoint(page: orders.PageDone) -> None:
        services.record_page(claim, records=page.records, new_by_site=page.new_by_site,
                             now=utcnow())
        if relaxed:
            # A page commit need not wait for its WAL flush: a database crash can lose
            # only the last moment's pages, atomically with their cursor, and the next
            # delivery reads them from Stora again. The item's settlement commits
            # durably, and with it every page before it.
            db.session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        db.session.commit()

    return orders.backfill_orders(client, claim.operator_id, checkpoint=checkpoint,
                                  deadline=time.monotonic() + SLICE_SECONDS)


def _release(claim: services.Claim, *, note: str | None) -> None:
    try:
        services.release(claim, now=utcnow(), note=note)
        db.session.commit()
    except services.ClaimLost:
        db.session.rollback()


def _finish(claim: services.Claim, outcome: ItemStatus, *,
            error: str | None = None) -> dict[str, Any]:
    try:
        closed = services.settle(claim, outcome, now=utcnow(), error=error)
        if outcome == ItemStatus.SUCCEEDED and claim.record_timeline:
            _announce(claim)
        db.session.commit()
    except services.ClaimLost:
        db.session.rollback()
        return {"superseded": True}
    log.info("sync.item_settled", extra={"run_id": claim.run_id, "operator_id": claim.operator_id,
                                         "status": outcome, "run_closed": closed})
    return {"status": str(outcome), "run_closed": closed}


def _announce(claim: services.Claim) -> None:
    """Queue one timeline event per site with new orders, in the settling transaction
    (the event rows are the durable promise; their jobs go out after the commit)."""
    from partner_app.timeline import jobs as timeline_jobs
    from partner_app.timeline import services as timeline

    tally = db.session.scalar(select(SyncRunItem.new_by_site)
                              .where(SyncRunItem.id == claim.item_id)) or {}
    for site_id, count in sorted(tally.items()):
        if count <= 0 or not site_id:
            continue
        event, created = timeline.create_event(
            claim.operator_id, f"sync:{claim.run_id}:{claim.name}:{site_id}",
            template=TIMELINE_TEMPLATE, variables={"order_count": count},
            related={"site": site_id},
            description=f"{count} new {claim.name} synced",
            external={"id": f"sync-run-{claim.run_id}"})
        if created:
            timeline_jobs.enqueue_after_commit_for(event.id, claim.operator_id)


# -- cron entry points ---------------------------------------------------------------------
def scheduled_sync(name: str) -> dict[str, Any]:
    """Start an all-operator run of ``name`` unless one is still running, so a slow run
    is never stacked on. A short Redis lock makes two overlapping calls (a cron leader
    failover) start at most one run between them."""
    lock = get_redis().lock(f"sync:start:{name}", timeout=60, blocking=False)
    if not lock.acquire():
        return {"skipped": "another start is in progress"}
    try:
        current = services.running_run(name)
        if current is not None:
            db.session.rollback()
            return {"skipped": f"run {current.id} still running"}
        run = services.start_sync(name, requested_by="cron")
        db.session.commit()
        return {"run_id": run.id, "total": run.total}
    finally:
        with contextlib.suppress(LockError):  # held past its timeout: already gone
            lock.release()


def _job_statuses(connection, ids: Sequence[str]) -> dict[str, str | None]:
    with connection.pipeline(transaction=False) as pipe:
        for one in ids:
            pipe.hget(Job.key_for(one), "status")
        found = pipe.execute()
    return {one: (raw.decode() if raw else None) for one, raw in zip(ids, found, strict=True)}


def sweep() -> dict[str, int]:
    """Repair runs whose jobs were lost: re-fan-out items never enqueued, re-enqueue
    items whose job vanished from Redis, and fail items whose job ended (retries spent,
    worker killed on its last attempt) without settling them. Idempotent; cron runs it.

    Only items untouched for ``SWEEP_GRACE_SECONDS`` are looked at, so nothing a live
    job is about to write is second-guessed.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=SWEEP_GRACE_SECONDS)
    connection = get_redis()
    repaired = {"refanned": 0, "requeued": 0, "failed": 0}
    for run in services.running_runs():
        run_id, started = run.id, run.started_at
        rows = [(item.id, item.operator_id, item.status, item.updated_at) for item in
                services.unsettled_items(run_id, before=cutoff, limit=SWEEP_BATCH)]
        db.session.commit()
        statuses = _job_statuses(connection, [job_id(run_id, op) for _, op, _, _ in rows]
                                 + [services.fan_out_job_id(run_id)])
        requeued = 0
        for item_id, operator_id, status, updated_at in rows:
            state = statuses[job_id(run_id, operator_id)]
            if state in ALIVE_JOB_STATUSES:
                continue
            if state is None:
                requeued += services.requeue_orphan(
                    item_id, seen_status=status, seen_updated_at=updated_at, now=now)
            else:
                repaired["failed"] += services.settle_orphan(
                    item_id, run_id, seen_status=status, seen_updated_at=updated_at, now=now,
                    error=f"job ended ({state}) without settling the item")
            db.session.commit()
        repaired["requeued"] += requeued
        parent_alive = statuses[services.fan_out_job_id(run_id)] in ALIVE_JOB_STATUSES
        if not parent_alive and (started < cutoff or requeued):
            repaired["refanned"] += fan_out_pending(run_id)
    if any(repaired.values()):
        log.warning("sync.swept", extra=repaired)
    return repaired
