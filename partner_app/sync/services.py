"""Sync runs and their items: start a run, claim an item, record progress, settle it.

Every function flushes; the caller (a job or the CLI) owns the transaction. Items change
state only through guarded ``UPDATE … WHERE`` statements, so two deliveries of the same
job cannot both hold an item, a superseded delivery cannot write progress
(:class:`ClaimLost`), and exactly one settling transaction closes the run: the one that
brings ``succeeded + failed + skipped`` up to ``total``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from rq import Retry
from sqlalchemy import Integer, and_, bindparam, case, func, insert, literal, or_, select, update

from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db, utcnow
from partner_app.queueing import QUEUE_SYNC, enqueue_after_commit
from partner_app.sync.models import (
    TERMINAL_ITEM_STATUSES,
    ItemStatus,
    RunStatus,
    SyncRun,
    SyncRunItem,
)

log = logging.getLogger(__name__)

SYNC_NAMES = ("orders",)
# Operators a sync serves. A degraded operator had transient errors and still works.
SYNCABLE_STATUSES = (OperatorStatus.ACTIVE, OperatorStatus.DEGRADED)
FAN_OUT_JOB = "partner_app.sync.jobs.fan_out"
FAN_OUT_RETRY = Retry(max=3, interval=[2, 10, 30])
_COUNTERS = {ItemStatus.SUCCEEDED: "succeeded", ItemStatus.FAILED: "failed",
             ItemStatus.SKIPPED: "skipped"}
_INSERT_CHUNK = 1000


class SyncError(Exception):
    """A sync cannot be started as asked (unknown sync name or operator)."""


class ClaimLost(Exception):
    """A later delivery of this item's job took it over; this one must stop writing."""


@dataclass(frozen=True)
class Claim:
    """The right of one job delivery to work on one item, fenced by ``attempt``."""

    item_id: int
    run_id: int
    operator_id: int
    attempt: int
    name: str
    record_timeline: bool
    # New records per site so far, as read at the claim; only the holder changes it.
    new_by_site: dict[str, int] = field(default_factory=dict)


def fan_out_job_id(run_id: int) -> str:
    return f"sync-{run_id}-fanout"


def start_sync(name: str, *, requested_by: str, operator_id: int | None = None,
               record_timeline: bool = True, now: datetime | None = None) -> SyncRun:
    """Create a run with one queued item per syncable operator (or for ``operator_id``)
    and queue its fan-out job for after the commit. Raises SyncError.

    A single-operator run includes the operator whatever its status; its job then
    records why it was skipped, which is what staff asking for it want to see.
    """
    if name not in SYNC_NAMES:
        raise SyncError(f"unknown sync {name!r}; known: {', '.join(SYNC_NAMES)}")
    now = now or utcnow()
    if operator_id is not None:
        if db.session.get(Operator, operator_id) is None:
            raise SyncError(f"no operator {operator_id}")
        operator_ids: Sequence[int] = [operator_id]
    else:
        operator_ids = db.session.scalars(
            select(Operator.id).where(Operator.status.in_(SYNCABLE_STATUSES))
            .order_by(Operator.id)).all()
    run = SyncRun(name=name, requested_by=requested_by[:200], operator_id=operator_id,
                  record_timeline=record_timeline, total=len(operator_ids), started_at=now)
    db.session.add(run)
    db.session.flush()
    for start in range(0, len(operator_ids), _INSERT_CHUNK):
        db.session.execute(insert(SyncRunItem), [
            {"run_id": run.id, "operator_id": op_id, "status": ItemStatus.QUEUED,
             "attempts": 0, "records": 0, "new_records": 0, "pages": 0, "new_by_site": {},
             "updated_at": now}
            for op_id in operator_ids[start:start + _INSERT_CHUNK]])
    if not operator_ids:
        run.status = RunStatus.COMPLETED
        run.finished_at = now
        run.fanned_out_at = now
    else:
        # If this job is lost (Redis down at commit) or fails for good, the sweeper
        # fans the run out from the items, which are the durable record.
        enqueue_after_commit(FAN_OUT_JOB, run.id, queue=QUEUE_SYNC,
                             job_id=fan_out_job_id(run.id), job_timeout=600,
                             retry=FAN_OUT_RETRY, failure_ttl=7 * 86400)
    db.session.flush()
    log.info("sync.started", extra={"run_id": run.id, "sync": name, "total": run.total,
                                    "requested_by": requested_by})
    return run


def running_run(name: str) -> SyncRun | None:
    """The newest all-operator run of ``name`` that is still running, if any."""
    return db.session.scalars(
        select(SyncRun).where(SyncRun.name == name, SyncRun.operator_id.is_(None),
                              SyncRun.status == RunStatus.RUNNING)
        .order_by(SyncRun.id.desc()).limit(1)).first()


# -- fan-out bookkeeping -----------------------------------------------------------------
def pending_fanout(run_id: int, *, limit: int) -> list[tuple[int, int]]:
    """``(item id, operator id)`` of queued items whose job was never enqueued."""
    rows = db.session.execute(
        select(SyncRunItem.id, SyncRunItem.operator_id)
        .where(SyncRunItem.run_id == run_id, SyncRunItem.status == ItemStatus.QUEUED,
               SyncRunItem.enqueued_at.is_(None))
        .order_by(SyncRunItem.id).limit(limit)).all()
    return [(row.id, row.operator_id) for row in rows]


def mark_enqueued(item_ids: Sequence[int], *, now: datetime) -> None:
    if item_ids:
        db.session.execute(update(SyncRunItem).where(SyncRunItem.id.in_(item_ids))
                           .values(enqueued_at=now).execution_options(synchronize_session=False))


def mark_fanned_out(run_id: int, *, now: datetime) -> None:
    db.session.execute(update(SyncRun).where(SyncRun.id == run_id,
                                             SyncRun.fanned_out_at.is_(None))
                       .values(fanned_out_at=now).execution_options(synchronize_session=False))


# -- the item life cycle -------------------------------------------------------------------
def claim_item(run_id: int, operator_id: int, *, attempt: int, now: datetime) -> Claim | None:
    """Take the item for delivery ``attempt`` of its job, or None if it is not ours.

    Claimable: a queued item, or a running one held by an *earlier* delivery (RQ only
    delivers again after the earlier delivery ended or was declared dead). Not
    claimable: a settled item, or one held by this same or a later delivery, which is
    a duplicate of a job already being worked on.
    """
    item_filter = and_(SyncRunItem.run_id == run_id, SyncRunItem.operator_id == operator_id)
    result = db.session.execute(
        update(SyncRunItem)
        .where(item_filter, or_(
            SyncRunItem.status == ItemStatus.QUEUED,
            and_(SyncRunItem.status == ItemStatus.RUNNING,
                 or_(SyncRunItem.claim_attempt.is_(None),
                     SyncRunItem.claim_attempt < attempt))))
        .values(status=ItemStatus.RUNNING, claim_attempt=attempt,
                attempts=SyncRunItem.attempts + 1,
                started_at=func.coalesce(SyncRunItem.started_at,
                                         literal(now, SyncRunItem.started_at.type)),
                updated_at=now)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return None
    row = db.session.execute(
        select(SyncRunItem.id, SyncRunItem.new_by_site, SyncRun.name, SyncRun.record_timeline)
        .join(SyncRun, SyncRun.id == SyncRunItem.run_id).where(item_filter)).one()
    return Claim(item_id=row.id, run_id=run_id, operator_id=operator_id, attempt=attempt,
                 name=row.name, record_timeline=row.record_timeline,
                 new_by_site=dict(row.new_by_site or {}))


def _held(claim: Claim):
    return and_(SyncRunItem.id == claim.item_id, SyncRunItem.status == ItemStatus.RUNNING,
                SyncRunItem.claim_attempt == claim.attempt)


def record_page(claim: Claim, *, records: int, new_by_site: dict[str, int],
                now: datetime) -> None:
    """Add one page to the item's progress (same transaction as the page's upserts, so
    progress and data commit together). Raises ClaimLost."""
    new_records = sum(new_by_site.values())
    params = {"item_id": claim.item_id, "attempt": claim.attempt, "records": records,
              "new_records": new_records, "now": now}
    if new_records:
        # The claim's copy is current: only the holder of the claim writes this row.
        for site, count in new_by_site.items():
            claim.new_by_site[site] = claim.new_by_site.get(site, 0) + count
        params["new_by_site"] = dict(claim.new_by_site)
    result = db.session.execute(_page_update(bool(new_records)), params)
    if result.rowcount != 1:
        raise ClaimLost(f"item {claim.item_id} is no longer held by attempt {claim.attempt}")


@functools.cache
def _page_update(with_sites: bool):
    """``record_page``'s guarded UPDATE with bound parameters, built once per shape (it
    runs once per page; building it cost more than running it)."""
    table = SyncRunItem.__table__
    values = {"pages": table.c.pages + 1,
              "records": table.c.records + bindparam("records", type_=Integer),
              "new_records": table.c.new_records + bindparam("new_records", type_=Integer),
              "updated_at": bindparam("now", type_=table.c.updated_at.type)}
    if with_sites:
        values["new_by_site"] = bindparam("new_by_site", type_=table.c.new_by_site.type)
    return (update(table)
            .where(table.c.id == bindparam("item_id"),
                   table.c.status == ItemStatus.RUNNING,
                   table.c.claim_attempt == bindparam("attempt"))
            .values(values))


def release(claim: Claim, *, now: datetime, note: str | None) -> None:
    """Put a held item back to queued for a later delivery (a retry, a rate-limit wait,
    the next slice), keeping its progress. Raises ClaimLost."""
    result = db.session.execute(
        update(SyncRunItem).where(_held(claim))
        .values(status=ItemStatus.QUEUED, error=note[:500] if note else None, updated_at=now)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        raise ClaimLost(f"item {claim.item_id} is no longer held by attempt {claim.attempt}")


def settle(claim: Claim, outcome: ItemStatus, *, now: datetime,
           error: str | None = None) -> bool:
    """Finish a held item. Returns True when this closed the run. Raises ClaimLost."""
    return _settle(claim.item_id, claim.run_id, _held(claim), outcome, now=now, error=error)


def settle_orphan(item_id: int, run_id: int, *, seen_status: str, seen_updated_at: datetime,
                  now: datetime, error: str) -> bool:
    """Fail an item whose job ended without settling it (found by the sweeper), unless
    it moved since it was read. Returns whether it did."""
    guard = and_(SyncRunItem.id == item_id, SyncRunItem.status == seen_status,
                 SyncRunItem.updated_at == seen_updated_at)
    try:
        _settle(item_id, run_id, guard, ItemStatus.FAILED, now=now, error=error)
    except ClaimLost:
        return False
    return True


def requeue_orphan(item_id: int, *, seen_status: str, seen_updated_at: datetime,
                   now: datetime) -> bool:
    """Send an item whose job vanished from Redis back to the fan-out."""
    result = db.session.execute(
        update(SyncRunItem)
        .where(SyncRunItem.id == item_id, SyncRunItem.status == seen_status,
               SyncRunItem.updated_at == seen_updated_at)
        .values(status=ItemStatus.QUEUED, enqueued_at=None, claim_attempt=None,
                updated_at=now, error="job lost; re-enqueued")
        .execution_options(synchronize_session=False))
    return result.rowcount == 1


def _settle(item_id: int, run_id: int, guard, outcome: ItemStatus, *, now: datetime,
            error: str | None) -> bool:
    if outcome not in TERMINAL_ITEM_STATUSES:
        raise ValueError(f"{outcome} is not a final item status")
    result = db.session.execute(
        update(SyncRunItem).where(guard)
        .values(status=outcome, error=error[:500] if error else None, finished_at=now,
                updated_at=now)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        raise ClaimLost(f"item {item_id} moved before it could be settled")
    counter = getattr(SyncRun, _COUNTERS[outcome])
    # The increment takes the run's row lock (PostgreSQL) or the write lock (SQLite)
    # until commit, so the close below sees every other item's committed settlement.
    db.session.execute(update(SyncRun).where(SyncRun.id == run_id)
                       .values({counter: counter + 1})
                       .execution_options(synchronize_session=False))
    closed = db.session.execute(
        update(SyncRun)
        .where(SyncRun.id == run_id, SyncRun.status == RunStatus.RUNNING,
               SyncRun.succeeded + SyncRun.failed + SyncRun.skipped >= SyncRun.total)
        .values(status=case((SyncRun.failed == 0, RunStatus.COMPLETED),
                            (SyncRun.succeeded == 0, RunStatus.FAILED),
                            else_=RunStatus.COMPLETED_WITH_FAILURES),
                finished_at=now)
        .execution_options(synchronize_session=False)).rowcount == 1
    if closed:
        log.info("sync.finished", extra={"run_id": run_id})
    return closed


# -- reading -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemView:
    operator_public_id: str
    operator_name: str | None
    status: str
    attempts: int
    pages: int
    records: int
    new_records: int
    error: str | None


def items_of(run_id: int, *, statuses: Sequence[str] | None = None,
             limit: int = 50) -> list[ItemView]:
    """Items of a run joined with their operator, failures first when asked."""
    stmt = (select(SyncRunItem, Operator.public_id, Operator.name)
            .join(Operator, Operator.id == SyncRunItem.operator_id)
            .where(SyncRunItem.run_id == run_id).order_by(SyncRunItem.id).limit(limit))
    if statuses:
        stmt = stmt.where(SyncRunItem.status.in_(statuses))
    return [ItemView(operator_public_id=public_id, operator_name=name, status=item.status,
                     attempts=item.attempts, pages=item.pages, records=item.records,
                     new_records=item.new_records, error=item.error)
            for item, public_id, name in db.session.execute(stmt)]


def unsettled_items(run_id: int, *, before: datetime, limit: int) -> list[SyncRunItem]:
    """Enqueued, unsettled items untouched since ``before`` (sweeper candidates)."""
    return list(db.session.scalars(
        select(SyncRunItem)
        .where(SyncRunItem.run_id == run_id,
               SyncRunItem.status.in_((ItemStatus.QUEUED, ItemStatus.RUNNING)),
               SyncRunItem.enqueued_at.is_not(None), SyncRunItem.updated_at < before)
        .order_by(SyncRunItem.updated_at).limit(limit)))


def running_runs() -> list[SyncRun]:
    return list(db.session.scalars(select(SyncRun).where(SyncRun.status == RunStatus.RUNNING)
                                   .order_by(SyncRun.id)))
