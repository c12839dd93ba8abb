"""Receiving deliveries into the durable inbox, and claiming them for processing.

``receive`` is the whole receipt contract: find the subscription by its route key,
verify the signature over the raw bytes, parse, and insert the event once per
``(operator, event.id)``. The caller commits and only then answers 2xx; a duplicate
counts a delivery and changes nothing else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from partner_app.connections.credentials import cipher_for_key
from partner_app.db import db, insert_for
from partner_app.security.models import DataKey
from partner_app.security.vault import Vault, VaultError
from partner_app.stora.signatures import HEADER, SignatureError, verify
from partner_app.webhooks.models import (
    InboxStatus,
    SubscriptionStatus,
    WebhookEvent,
    WebhookSubscription,
)

log = logging.getLogger(__name__)

SECRET_TABLE = "webhook_subscriptions"  # noqa: S105 (a table name)
SECRET_COLUMN = "secret_ct"  # noqa: S105 (a column name)
# Headers kept with the event for support and audits (never the signature's secret).
KEPT_HEADERS = ("Content-Type", "User-Agent", "X-Stora-Request-Id", HEADER)
DELIVERY_MARK_EVERY = timedelta(seconds=60)


class Rejected(Exception):
    """Not stored. ``status`` is the HTTP answer; ``reason`` is safe to log."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Received:
    event: WebhookEvent
    duplicate: bool


def live_subscription(route_key: str, *, now: datetime) -> WebhookSubscription | None:
    """The subscription a delivery URL names, if it may still receive."""
    if not route_key or len(route_key) > 64:
        return None
    sub = db.session.scalars(select(WebhookSubscription).where(
        WebhookSubscription.route_key == route_key)).one_or_none()
    if sub is None or sub.secret_ct is None:
        return None
    if sub.status == SubscriptionStatus.ACTIVE:
        return sub
    if sub.status == SubscriptionStatus.RETIRING and sub.retire_after and sub.retire_after > now:
        return sub
    return None


def subscription_secret(sub: WebhookSubscription, *, vault: Vault) -> str:
    key = db.session.get(DataKey, sub.data_key_id)
    if key is None:
        raise VaultError("data key missing")
    return cipher_for_key(key, vault=vault).decrypt(SECRET_TABLE, SECRET_COLUMN, sub.secret_ct)


def _envelope(body: bytes) -> tuple[str, str, dict[str, Any]]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise Rejected(400, "malformed_json") from None
    event = document.get("event") if isinstance(document, dict) else None
    if not isinstance(event, dict):
        raise Rejected(400, "no_event")
    event_id, event_type = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= 100:
        raise Rejected(400, "no_event_id")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 100:
        raise Rejected(400, "no_event_type")
    return event_id, event_type, event


def receive(route_key: str, body: bytes, headers: dict[str, str], *, vault: Vault,
            now: datetime, tolerance: int) -> Received:
    """Verify and store one delivery (flush only). Raises Rejected."""
    sub = live_subscription(route_key, now=now)
    if sub is None:
        raise Rejected(404, "unknown_route")
    try:
        secret = subscription_secret(sub, vault=vault)
    except VaultError:
        log.error("webhook.secret_unreadable", extra={"subscription_id": sub.id})
        raise Rejected(503, "secret_unreadable") from None
    try:
        signed_at = verify(body, headers.get(HEADER), [secret], now=now.timestamp(),
                           tolerance=tolerance)
    except SignatureError as exc:
        raise Rejected(401 if exc.reason == "no_match" else 400, exc.reason) from None
    event_id, event_type, _ = _envelope(body)
    kept = {name: headers[name] for name in KEPT_HEADERS if name in headers}
    inserted = db.session.execute(
        insert_for(WebhookEvent).values(
            operator_id=sub.operator_id, subscription_id=sub.id, event_id=event_id,
            event_type=event_type, signed_at=datetime.fromtimestamp(signed_at, UTC),
            received_at=now, body=body.decode("utf-8"), headers=kept,
            status=InboxStatus.PENDING, deliveries=1, attempts=0)
        .on_conflict_do_nothing(index_elements=["operator_id", "event_id"])
        .returning(WebhookEvent.id)).scalar_one_or_none()
    if inserted is not None:
        if sub.last_delivery_at is None or now - sub.last_delivery_at > DELIVERY_MARK_EVERY:
            sub.last_delivery_at = now  # coarse on purpose: one write a minute, not each
        return Received(event=db.session.get(WebhookEvent, inserted), duplicate=False)
    existing = _find(sub.operator_id, event_id)
    db.session.execute(update(WebhookEvent).where(WebhookEvent.id == existing.id)
                       .values(deliveries=WebhookEvent.deliveries + 1)
                       .execution_options(synchronize_session=False))
    return Received(event=existing, duplicate=True)


def _find(operator_id: int, event_id: str) -> WebhookEvent | None:
    return db.session.scalars(select(WebhookEvent).where(
        WebhookEvent.operator_id == operator_id, WebhookEvent.event_id == event_id)
    ).one_or_none()


# Longer than any job may run (RQ's default timeout is 180 s): an older claim is dead.
CLAIM_LEASE = timedelta(minutes=5)


def claim(event_id: int, *, now: datetime, replay: bool = False) -> WebhookEvent | None:
    """Move an event to ``processing`` if nobody is working on it. None = not ours.

    A ``processing`` claim older than CLAIM_LEASE belonged to a job that died and may be
    taken over. ``replay`` also re-runs events that were processed or ignored.
    """
    allowed = [InboxStatus.PENDING, InboxStatus.FAILED]
    if replay:
        allowed += [InboxStatus.PROCESSED, InboxStatus.IGNORED]
    claimed = db.session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == event_id,
               or_(WebhookEvent.status.in_(allowed),
                   and_(WebhookEvent.status == InboxStatus.PROCESSING,
                        WebhookEvent.claimed_at < now - CLAIM_LEASE)))
        .values(status=InboxStatus.PROCESSING, attempts=WebhookEvent.attempts + 1,
                claimed_at=now)
        .execution_options(synchronize_session=False))
    if claimed.rowcount != 1:
        return None
    return db.session.get(WebhookEvent, event_id, populate_existing=True)


def stale(*, now: datetime, pending_for: timedelta, limit: int) -> list[int]:
    """Events whose processing never started, or whose claim expired (the outbox gap)."""
    return list(db.session.scalars(
        select(WebhookEvent.id)
        .where(or_(and_(WebhookEvent.status == InboxStatus.PENDING,
                        WebhookEvent.received_at < now - pending_for),
                   and_(WebhookEvent.status == InboxStatus.PROCESSING,
                        WebhookEvent.claimed_at < now - CLAIM_LEASE)))
        .order_by(WebhookEvent.id).limit(limit)))
