"""Who did what, when: staff, the system, or an operator acting through Stora.

``record`` adds a row to the current session; the caller's transaction commits it
together with the change it describes. ``detail`` must never carry a secret.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from partner_app.db import db, utcnow


class AuditEntry(db.Model):
    __tablename__ = "audit_log"
    __table_args__ = (
        # Counts of one action over a time window (the overview), and the audit log
        # filtered by actor, newest first.
        Index("ix_audit_log_action_created_at", "action", "created_at"),
        Index("ix_audit_log_actor_id", "actor", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor_type: Mapped[str] = mapped_column(String(20))  # staff | system | operator
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(80), index=True)
    operator_id: Mapped[int | None] = mapped_column(
        ForeignKey("operators.id", ondelete="SET NULL"), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def record(action: str, *, actor_type: str, actor: str, operator_id: int | None = None,
           **detail: Any) -> AuditEntry:
    """Add an audit entry to the session (flushed with the caller's transaction)."""
    entry = AuditEntry(action=action, actor_type=actor_type, actor=actor,
                       operator_id=operator_id, detail=detail)
    db.session.add(entry)
    return entry
