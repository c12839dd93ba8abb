"""Enforcing retention: due operator purges, the inbox and the audit log.

``run_retention`` deletes in batches of ``batch_size`` rows and commits after each
batch, so a long run holds no long transaction, shows progress, and a run that dies
resumes where it stopped (deletion is idempotent; a purge's counts are updated in the
same transaction as the rows they count). One run at a time across the fleet: a
Redis lock (redis-py's ``Lock``, renewed per batch) makes a second, concurrent run
(the cron and an operator's ``partner-app retention run``) step aside instead of
double counting.

What goes, in order:

1. purges whose ``delete_after`` has passed: the operator's mirror data (inbox events,
   webhook subscriptions, timeline records, synced orders, sync items and cursors);
   the operator row stays as a tombstone (status ``disconnected``, public id) with
   the fields Stora told us about it (name, storefront host, identity) cleared. An
   operator that reconnected since its purge was scheduled keeps everything, and the
   purge is ``cancelled``;
2. inbox events ``processed`` or ``ignored`` and received before the inbox cutoff
   (``failed`` and unfinished events stay: they still need attention);
3. audit entries older than the audit cutoff.

Each step that deleted something leaves a ``deletion_records`` row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from redis import Redis
from sqlalchemy import ColumnElement, delete, func, select

from partner_app import audit
from partner_app.audit import AuditEntry
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db
from partner_app.lifecycle.models import DeletionRecord, DeletionScope, DeletionStatus
from partner_app.lifecycle.settings import RetentionSettings
from partner_app.sync.models import SyncCursor, SyncedOrder, SyncRunItem
from partner_app.timeline.models import TimelineEvent
from partner_app.webhooks.models import InboxStatus, WebhookEvent, WebhookSubscription

log = logging.getLogger(__name__)

LOCK_KEY = "partner-app:retention:lock"
LOCK_SECONDS = 300
DEFAULT_BATCH = 1000

# An operator's mirror data, children before parents (events point at subscriptions).
MIRROR_MODELS = (WebhookEvent, WebhookSubscription, TimelineEvent, SyncedOrder, SyncRunItem,
                 SyncCursor)
EXPIRED_INBOX_STATUSES = (InboxStatus.PROCESSED, InboxStatus.IGNORED)


class RetentionBusy(Exception):
    """Another retention run holds the lock; nothing was done."""


@dataclass
class RetentionReport:
    purges_completed: list[str] = field(default_factory=list)
    purges_cancelled: list[str] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, count: int) -> None:
        if count:
            self.deleted[table] = self.deleted.get(table, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {"purges_completed": self.purges_completed,
                "purges_cancelled": self.purges_cancelled, "deleted": self.deleted}

    def summary(self) -> str:
        deleted = ", ".join(f"{table}: {n}" for table, n in sorted(self.deleted.items()))
        return (f"purges completed: {len(self.purges_completed)}, cancelled: "
                f"{len(self.purges_cancelled)}; rows deleted: {deleted or 'none'}")


def due_purges(now: datetime) -> list[DeletionRecord]:
    return list(db.session.scalars(
        select(DeletionRecord)
        .where(DeletionRecord.scope == DeletionScope.OPERATOR_PURGE,
               DeletionRecord.status == DeletionStatus.SCHEDULED,
               DeletionRecord.delete_after <= now)
        .order_by(DeletionRecord.delete_after, DeletionRecord.id)))


def _inbox_expired(now: datetime, settings: RetentionSettings) -> ColumnElement[bool]:
    return (WebhookEvent.status.in_([str(s) for s in EXPIRED_INBOX_STATUSES])
            & (WebhookEvent.received_at < now - settings.inbox))


def _audit_expired(now: datetime, settings: RetentionSettings) -> ColumnElement[bool]:
    return AuditEntry.created_at < now - settings.audit


def _count(model, condition: ColumnElement[bool]) -> int:
    return db.session.scalar(select(func.count()).select_from(model).where(condition)) or 0


def pending_deletions(now: datetime, settings: RetentionSettings) -> dict[str, int]:
    """Rows a run at ``now`` would delete, per table (the progress bar's total)."""
    totals: dict[str, int] = {}
    operator_ids = [r.operator_id for r in due_purges(now) if r.operator_id is not None]
    if operator_ids:
        for model in MIRROR_MODELS:
            totals[model.__tablename__] = _count(model, model.operator_id.in_(operator_ids))
    totals["webhook_events"] = totals.get("webhook_events", 0) + _count(
        WebhookEvent, _inbox_expired(now, settings))
    totals["audit_log"] = _count(AuditEntry, _audit_expired(now, settings))
    db.session.rollback()
    return totals


def _delete_batch(model, condition: ColumnElement[bool], batch_size: int) -> int:
    ids = select(model.id).where(condition).limit(batch_size)
    return db.session.execute(
        delete(model).where(model.id.in_(ids))
        .execution_options(synchronize_session=False)).rowcount


def run_retention(*, redis: Redis, settings: RetentionSettings, now: datetime, actor_type: str,
                  actor: str, commit: Callable[[], None],
                  progress: Callable[[int], Any] | None = None,
                  batch_size: int = DEFAULT_BATCH) -> RetentionReport:
    """Run every retention step at ``now``. ``commit`` is called after each batch.

    Raises ``RetentionBusy`` when another run is in progress.
    """
    lock = redis.lock(LOCK_KEY, timeout=LOCK_SECONDS, blocking=False, thread_local=False)
    if not lock.acquire():
        raise RetentionBusy()
    report = RetentionReport()

    def batches(model, condition: ColumnElement[bool], on_batch=None) -> int:
        total = 0
        while True:
            deleted = _delete_batch(model, condition, batch_size)
            if on_batch is not None and deleted:
                on_batch(deleted)
            commit()
            lock.reacquire()  # still ours, for another LOCK_SECONDS
            total += deleted
            if progress is not None and deleted:
                progress(deleted)
            if deleted < batch_size:
                return total

    try:
        for record in due_purges(now):
            _complete_purge(record, now=now, actor_type=actor_type, actor=actor,
                            batches=batches, report=report)
            commit()
        inbox = batches(WebhookEvent, _inbox_expired(now, settings))
        _record_retention(DeletionScope.INBOX_RETENTION, "webhook_events", inbox, now=now,
                          days=settings.inbox_days, actor_type=actor_type, actor=actor,
                          report=report)
        audited = batches(AuditEntry, _audit_expired(now, settings))
        _record_retention(DeletionScope.AUDIT_RETENTION, "audit_log", audited, now=now,
                          days=settings.audit_days, actor_type=actor_type, actor=actor,
                          report=report)
        commit()
    finally:
        lock.release()
    log.info("retention.run", extra={"purges_completed": len(report.purges_completed),
                                     "purges_cancelled": len(report.purges_cancelled),
                                     "deleted": report.deleted})
    return report


def _complete_purge(record: DeletionRecord, *, now: datetime, actor_type: str, actor: str,
                    batches, report: RetentionReport) -> None:
    operator = db.session.get(Operator, record.operator_id) if record.operator_id else None
    if operator is not None and operator.status != OperatorStatus.DISCONNECTED:
        record.status = DeletionStatus.CANCELLED
        record.completed_at = now
        record.detail = {**record.detail, "cancelled_because": f"operator is {operator.status}"}
        audit.record("operator.purge_cancelled", actor_type=actor_type, actor=actor,
                     operator_id=operator.id, deletion_record_id=record.id)
        report.purges_cancelled.append(record.operator_ref or "")
        return
    if operator is not None:
        for model in MIRROR_MODELS:
            table = model.__tablename__

            def count(deleted: int, table: str = table) -> None:
                record.counts = {**record.counts, table: record.counts.get(table, 0) + deleted}

            report.add(table, batches(model, model.operator_id == operator.id, count))
        # The tombstone keeps our own ids only; what Stora told us about the operator goes.
        operator.name = None
        operator.storefront_host = None
        operator.stora_identity = None
        operator.last_error = None
    record.status = DeletionStatus.COMPLETED
    record.completed_at = now
    audit.record("operator.purged", actor_type=actor_type, actor=actor,
                 operator_id=record.operator_id, deletion_record_id=record.id,
                 counts=record.counts)
    report.purges_completed.append(record.operator_ref or "")


def _record_retention(scope: DeletionScope, table: str, count: int, *, now: datetime, days: int,
                      actor_type: str, actor: str, report: RetentionReport) -> None:
    if not count:
        return
    report.add(table, count)
    db.session.add(DeletionRecord(
        scope=scope, status=DeletionStatus.COMPLETED, requested_by_type=actor_type,
        requested_by=actor, requested_at=now, completed_at=now, counts={table: count},
        detail={"older_than_days": days, "cutoff": (now - timedelta(days=days)).isoformat()}))
