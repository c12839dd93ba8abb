"""Sync runs, their per-operator items, per-operator cursors, and the order mirror.

A *run* is one request to sync something (``"orders"``) for every active operator or for
one. It has one *item* per operator; items move ``queued → running → succeeded | failed
| skipped`` and the run's counters move with them, so progress is a single-row read.
A *cursor* is where the last committed page left off for one operator and one sync, so
a killed job resumes from there. ``synced_orders`` is the partner's copy of each
operator's Stora orders, keyed by (operator, Stora id).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from partner_app.db import db, utcnow


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    FAILED = "failed"  # nothing succeeded and something failed


class ItemStatus(StrEnum):
    QUEUED = "queued"  # waiting for (another) delivery of its job
    RUNNING = "running"  # claimed by one delivery (``claim_attempt``)
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # final: permanent error, or retries exhausted
    SKIPPED = "skipped"  # the operator cannot be synced (disconnected, needs_reauth)


TERMINAL_ITEM_STATUSES = frozenset({ItemStatus.SUCCEEDED, ItemStatus.FAILED,
                                    ItemStatus.SKIPPED})


class SyncRun(db.Model):
    """One sync request. Counters are maintained by the items' transitions."""

    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(30), default=RunStatus.RUNNING, index=True)
    requested_by: Mapped[str] = mapped_column(String(200))
    # Set for a single-operator run; NULL means "every active operator".
    operator_id: Mapped[int | None] = mapped_column(ForeignKey("operators.id",
                                                               ondelete="SET NULL"))
    # Whether a succeeded item with new records announces them on the operator's timeline.
    record_timeline: Mapped[bool] = mapped_column(Boolean, default=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    fanned_out_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.skipped

    def __repr__(self) -> str:
        return f"<SyncRun {self.id} {self.name} {self.status} {self.done}/{self.total}>"


class SyncRunItem(db.Model):
    """One operator's share of a run, claimed by at most one job delivery at a time.

    ``claim_attempt`` is the delivery number of the job that holds a running item; a
    later delivery of the same job (RQ only re-delivers after the earlier one ended or
    was declared dead) may take it over, and every write of the holder is fenced on it.
    """

    __tablename__ = "sync_run_items"
    __table_args__ = (
        UniqueConstraint("run_id", "operator_id", name="uq_sync_run_items_run_id_operator_id"),
        Index("ix_sync_run_items_run_id_status", "run_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("sync_runs.id", ondelete="CASCADE"))
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"),
                                             index=True)
    status: Mapped[str] = mapped_column(String(20), default=ItemStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_attempt: Mapped[int | None] = mapped_column(Integer)
    records: Mapped[int] = mapped_column(Integer, default=0)
    new_records: Mapped[int] = mapped_column(Integer, default=0)
    pages: Mapped[int] = mapped_column(Integer, default=0)
    # New records per Stora site id (what the timeline announcement reports).
    new_by_site: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    # Stora error code / exception class and status only: never a response body.
    error: Mapped[str | None] = mapped_column(String(500))
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<SyncRunItem run={self.run_id} operator={self.operator_id} {self.status}>"


class SyncCursor(db.Model):
    """Where one sync stands for one operator.

    The watermark is the ``updated_at`` of the last record committed, with its id; Stora's
    ``updated_after`` is inclusive, so the next request starts *at* the watermark and
    re-reads the records that share it (harmless upserts). ``page`` is the page to ask
    for at that watermark: above 1 only while a whole page shares one timestamp.
    """

    __tablename__ = "sync_cursors"
    __table_args__ = (
        UniqueConstraint("operator_id", "name", name="uq_sync_cursors_operator_id_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(40))
    watermark: Mapped[datetime | None]
    last_id: Mapped[str | None] = mapped_column(String(64))
    page: Mapped[int] = mapped_column(Integer, default=1)
    last_success_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SyncedOrder(db.Model):
    """The partner's copy of one Stora order (money in minor units)."""

    __tablename__ = "synced_orders"
    __table_args__ = (
        UniqueConstraint("operator_id", "stora_id", name="uq_synced_orders_operator_id_stora_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"))
    stora_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str | None] = mapped_column(String(40))
    contact_id: Mapped[str | None] = mapped_column(String(64))
    site_id: Mapped[str | None] = mapped_column(String(64))
    total_amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    stora_created_at: Mapped[datetime | None]
    stora_updated_at: Mapped[datetime | None]
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_synced_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_synced_at: Mapped[datetime] = mapped_column(default=utcnow)
