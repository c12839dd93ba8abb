"""Timeline events the platform owes operators: one row per action, recorded once.

Stora requires partners to show on the operator's timeline what they did on the
operator's behalf (stora-api/timeline.md §1). A row is the durable promise to do so:
claimed by its unique (operator, action key) before any call, so a repeated action
never makes a second entry, and kept ``pending`` until Stora confirms it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from partner_app.db import db, utcnow


class EventStatus(StrEnum):
    PENDING = "pending"
    RECORDED = "recorded"
    FAILED = "failed"  # permanent: Stora refused it (e.g. missing template or scope)


class TimelineEvent(db.Model):
    """One action to record on one operator's Stora timeline.

    ``request`` holds what the event says (template name, variables, related Stora ids,
    description, external reference): ids and words, never a secret. ``key_generation``
    is bumped only after Stora *answered* with an error, because Stora replays a stored
    answer for the same Idempotency-Key for 24 hours; a lost answer keeps the key.
    """

    __tablename__ = "timeline_events"
    __table_args__ = (
        UniqueConstraint("operator_id", "action_key",
                         name="uq_timeline_events_operator_id_action_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"))
    action_key: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    stora_event_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=EventStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    key_generation: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    recorded_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<TimelineEvent {self.operator_id}:{self.action_key} {self.status}>"
