"""``deletion_records``: what the platform deleted, when, why and on whose request.

The partner's evidence for compliance (an operator's request to be forgotten, the
retention policy at work). A record names the operator only by its public id, and
holds counts, never the deleted content or any personal data.

Scopes:

* ``operator_purge``: one per purge; ``scheduled`` with ``delete_after`` when the
  operator is purged, ``completed`` once its mirror data is gone (``counts`` per table),
  or ``cancelled`` when the operator reconnected before that;
* ``inbox_retention`` / ``audit_retention``: one per retention run that deleted
  something, ``completed`` at once, with the cutoff in ``detail``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from partner_app.db import db, utcnow


class DeletionScope(StrEnum):
    OPERATOR_PURGE = "operator_purge"
    INBOX_RETENTION = "inbox_retention"
    AUDIT_RETENTION = "audit_retention"


class DeletionStatus(StrEnum):
    SCHEDULED = "scheduled"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class DeletionRecord(db.Model):
    __tablename__ = "deletion_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(30), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    # The operator's public id (op_…): kept when the operator row is gone.
    operator_ref: Mapped[str | None] = mapped_column(String(32), index=True)
    operator_id: Mapped[int | None] = mapped_column(
        ForeignKey("operators.id", ondelete="SET NULL"))
    requested_by_type: Mapped[str] = mapped_column(String(20))  # staff | system
    requested_by: Mapped[str] = mapped_column(String(200))
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    delete_after: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    # Rows deleted per table, e.g. {"synced_orders": 120, "webhook_events": 4}.
    counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    # Non-personal facts: what the disconnect did, the cutoff applied, why cancelled.
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    def __repr__(self) -> str:
        return f"<DeletionRecord {self.id} {self.scope} {self.status} {self.operator_ref}>"
