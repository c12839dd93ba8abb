"""Webhook subscriptions (our desired state per operator) and the durable inbox.

A *subscription* is one Stora webhook endpoint we own for one operator. Its URL carries
a random ``route_key`` (never the operator's id), and its signing secret, which Stora
shows only once, is stored encrypted with the operator's data key. During a secret
rotation two subscriptions of an operator are live: the new one ``active`` and the old
one ``retiring`` until ``retire_after``; deliveries to either verify.

The *inbox* (``webhook_events``) keeps every verified delivery, raw, before we answer
2xx; ``(operator_id, event_id)`` is unique, so a duplicate is stored once.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from partner_app.db import db, utcnow


class SubscriptionStatus(StrEnum):
    PENDING = "pending"  # wanted; no Stora endpoint yet (or its create is in doubt)
    ACTIVE = "active"  # the endpoint exists at Stora, enabled, secret stored
    RETIRING = "retiring"  # superseded by a rotation; still verifies until retire_after
    DISABLED = "disabled"  # disabled at Stora by us (disconnect, rotation finished)
    FAILED = "failed"  # the reconciler cannot repair it; see last_error


LIVE_STATUSES = (SubscriptionStatus.ACTIVE, SubscriptionStatus.RETIRING)


def new_route_key() -> str:
    return secrets.token_urlsafe(24)


class WebhookSubscription(db.Model):
    __tablename__ = "webhook_subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"),
                                             index=True)
    route_key: Mapped[str] = mapped_column(String(64), unique=True, default=new_route_key)
    status: Mapped[str] = mapped_column(String(20), default=SubscriptionStatus.PENDING,
                                        index=True)
    url: Mapped[str] = mapped_column(String(500))
    event_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    stora_endpoint_id: Mapped[str | None] = mapped_column(String(64))
    # Encrypted with the operator's data key (table webhook_subscriptions, column secret_ct).
    secret_ct: Mapped[str | None] = mapped_column(Text)
    data_key_id: Mapped[int | None] = mapped_column(ForeignKey("data_keys.id"))
    # Sent with the create call so a retry after a lost response is replayed by Stora
    # (secret included) instead of creating a second endpoint.
    create_idempotency_key: Mapped[str] = mapped_column(
        String(64), default=lambda: secrets.token_hex(16))
    retire_after: Mapped[datetime | None]
    last_reconciled_at: Mapped[datetime | None]
    last_delivery_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        return f"<WebhookSubscription {self.id} operator={self.operator_id} {self.status}>"


class InboxStatus(StrEnum):
    PENDING = "pending"  # stored, not yet processed
    PROCESSING = "processing"  # claimed by one job
    PROCESSED = "processed"
    FAILED = "failed"  # the handler failed; kept with its error, replayable
    IGNORED = "ignored"  # no handler for this event type


class WebhookEvent(db.Model):
    """One verified delivery, stored before we acknowledge it."""

    __tablename__ = "webhook_events"
    __table_args__ = (UniqueConstraint("operator_id", "event_id",
                                       name="uq_webhook_events_operator_event"),
                      # The drain claims the oldest pending events: no sort, no scan.
                      Index("ix_webhook_events_status_id", "status", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"))
    subscription_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="SET NULL"))
    event_id: Mapped[str] = mapped_column(String(100))
    event_type: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(20), default=InboxStatus.PENDING)
    signed_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    deliveries: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the current ``processing`` claim was taken; an old one means its job died.
    claimed_at: Mapped[datetime | None]
    # The RQ job holding the ``processing`` claim and its delivery number: a later
    # delivery of the same job (a retry after its worker died) takes the claim over at
    # once; anyone else waits for the lease to lapse.
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claim_delivery: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    processed_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<WebhookEvent {self.id} {self.event_type} {self.event_id} {self.status}>"
