"""Receiving deliveries into the durable inbox, and claiming them for processing.

``receive`` is the whole receipt contract: find the subscription by its route key,
verify the signature over the raw bytes, parse, and insert the event once per
``(operator, event.id)``. The caller commits and only then answers 2xx; a duplicate
counts a delivery and changes nothing else.

Each web process remembers, for a minute and in memory only, the routes it verified
and their decrypted secrets: a delivery to such a route costs one guarded statement
that re-checks the route in the database, so nothing remembered outlives a disable, a
new secret or a destroyed key. ``claim``, ``claim_batch`` and ``settle`` fence
processing by the job delivery that holds each claim.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from partner_app import failpoints
from partner_app.connections.credentials import cipher_for_key
from partner_app.db import db
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
    event_row_id: int
    operator_id: int
    duplicate: bool


# Decrypted secrets, per process, for SECRET_CACHE_TTL: a hit saves the data-key unwrap
# and the decryption on every delivery. Keyed by everything the plaintext derives from
# (subscription, data key, wrapped key, ciphertext), and consulted only after the route
# was read afresh, so a rotation, a re-wrap, a disable or a destroyed key is seen at once.
SECRET_CACHE_TTL = 60.0
SECRET_CACHE_MAX = 4096
_secrets: dict[tuple, tuple[float, str]] = {}


@dataclass(frozen=True)
class Route:
    """What a delivery URL resolves to: one live subscription and its key material."""

    subscription_id: int
    operator_id: int
    secret_ct: str
    data_key_id: int
    wrapped_key: str
    last_delivery_at: datetime | None


_subs = WebhookSubscription.__table__
_keys = DataKey.__table__
_events = WebhookEvent.__table__
_ROUTE = (select(_subs.c.id, _subs.c.operator_id, _subs.c.status, _subs.c.retire_after,
                 _subs.c.secret_ct, _subs.c.data_key_id, _subs.c.last_delivery_at,
                 _keys.c.wrapped_key, _keys.c.destroyed_at)
          .select_from(_subs.outerjoin(_keys, _keys.c.id == _subs.c.data_key_id))
          .where(_subs.c.route_key == bindparam("route_key")))


def find_route(conn: Connection, route_key: str, *, now: datetime) -> Route | None:
    """The live subscription a delivery URL names (one indexed read), or None."""
    if not route_key or len(route_key) > 64:
        return None
    row = conn.execute(_ROUTE, {"route_key": route_key}).first()
    if row is None or row.secret_ct is None:
        return None
    live = row.status == SubscriptionStatus.ACTIVE or (
        row.status == SubscriptionStatus.RETIRING and row.retire_after is not None
        and row.retire_after > now)
    if not live:
        return None
    if row.data_key_id is None or row.wrapped_key is None or row.destroyed_at is not None:
        # Key material gone (crypto-shredded): nothing can verify this route.
        log.error("webhook.secret_unreadable", extra={"subscription_id": row.id})
        raise Rejected(503, "secret_unreadable")
    return Route(row.id, row.operator_id, row.secret_ct, row.data_key_id, row.wrapped_key,
                 row.last_delivery_at)


def route_secret(route: Route, *, vault: Vault) -> str:
    """The route's signing secret, decrypted (or from the per-process cache)."""
    cache_key = (route.subscription_id, route.data_key_id, route.wrapped_key,
                 route.secret_ct)
    cached = _secrets.get(cache_key)
    clock = time.monotonic()
    if cached is not None and cached[0] > clock:
        return cached[1]
    cipher = vault.cipher_for(operator_id=route.operator_id, data_key_id=route.data_key_id,
                              wrapped_key=route.wrapped_key)
    secret = cipher.decrypt(SECRET_TABLE, SECRET_COLUMN, route.secret_ct)
    if len(_secrets) >= SECRET_CACHE_MAX:
        _secrets.clear()
    _secrets[cache_key] = (clock + SECRET_CACHE_TTL, secret)
    return secret


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


_STORE: dict[tuple[str, bool], Any] = {}  # built once per (dialect, guarded)
_EVENT_VALUES = ("operator_id", "subscription_id", "event_id", "event_type", "signed_at",
                 "received_at", "body", "headers", "status", "deliveries", "attempts")


def _store_statement(dialect: str, *, guarded: bool):
    """Insert the event, or count one more delivery of it: one statement either way.

    ``deliveries`` comes back 1 for a new row and more for a duplicate, which tells the
    two apart on PostgreSQL and SQLite alike. The guarded form inserts only while the
    subscription is still live with the very key material the signature was checked
    against (no row back otherwise), so a route remembered by this process costs no
    read of its own and still sees a disable, a rotation or a destroyed key at once.
    """
    statement = _STORE.get((dialect, guarded))
    if statement is not None:
        return statement
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"no INSERT … ON CONFLICT for {dialect}")
    if guarded:
        params = {name: bindparam(name, type_=_events.c[name].type)
                  for name in _EVENT_VALUES if name not in ("operator_id", "subscription_id")}
        source = (select(_subs.c.operator_id, _subs.c.id, *params.values())
                  .select_from(_subs.join(_keys, _keys.c.id == _subs.c.data_key_id))
                  .where(_subs.c.id == bindparam("route_subscription_id"),
                         _subs.c.secret_ct == bindparam("route_secret_ct"),
                         _keys.c.wrapped_key == bindparam("route_wrapped_key"),
                         _keys.c.destroyed_at.is_(None),
                         or_(_subs.c.status == SubscriptionStatus.ACTIVE,
                             and_(_subs.c.status == SubscriptionStatus.RETIRING,
                                  _subs.c.retire_after > bindparam(
                                      "route_now", type_=_subs.c.retire_after.type)))))
        statement = insert(_events).from_select(list(_EVENT_VALUES), source)
    else:
        statement = insert(_events)
    statement = (statement
                 .on_conflict_do_update(index_elements=["operator_id", "event_id"],
                                        set_={"deliveries": _events.c.deliveries + 1})
                 .returning(_events.c.id, _events.c.deliveries))
    _STORE[(dialect, guarded)] = statement
    return statement


_MARK_DELIVERY = (update(_subs)
                  .where(_subs.c.id == bindparam("sub_id"),
                         or_(_subs.c.last_delivery_at.is_(None),
                             _subs.c.last_delivery_at < bindparam("cutoff")))
                  .values(last_delivery_at=bindparam("now")))

# Routes this process verified recently: (expires, route, secret). Used only through
# the guarded store above, which re-checks the route in the same statement.
_routes: dict[str, tuple[float, Route, str]] = {}
# When this process last marked each subscription's last_delivery_at.
_marked: dict[int, datetime] = {}


def receive(conn: Connection, route_key: str, body: bytes, headers: Mapping[str, str], *,
            vault: Vault, now: datetime, tolerance: int) -> Received:
    """Verify and store one delivery on ``conn`` (the caller commits). Raises Rejected.

    A route this process verified in the last SECRET_CACHE_TTL seconds costs one
    statement (the guarded store); otherwise the route is read, its secret decrypted
    (or taken from the cache) and the event stored. A delivery the remembered secret
    does not verify, or whose guarded store finds the route changed, takes the full
    path, so the answer is always the one the current route gives.
    """
    if not route_key or len(route_key) > 64:
        raise Rejected(404, "unknown_route")
    remembered = _routes.get(route_key)
    if remembered is not None and remembered[0] > time.monotonic():
        _, route, secret = remembered
        try:
            signed_at = verify(body, headers.get(HEADER), [secret], now=now.timestamp(),
                               tolerance=tolerance)
        except SignatureError:
            signed_at = None
        if signed_at is not None:
            received = _store(conn, route, body, headers, signed_at, now=now, guarded=True)
            if received is not None:
                return received
        _routes.pop(route_key, None)
    route = find_route(conn, route_key, now=now)
    if route is None:
        raise Rejected(404, "unknown_route")
    try:
        secret = route_secret(route, vault=vault)
    except VaultError:
        log.error("webhook.secret_unreadable", extra={"subscription_id": route.subscription_id})
        raise Rejected(503, "secret_unreadable") from None
    try:
        signed_at = verify(body, headers.get(HEADER), [secret], now=now.timestamp(),
                           tolerance=tolerance)
    except SignatureError as exc:
        raise Rejected(401 if exc.reason == "no_match" else 400, exc.reason) from None
    received = _store(conn, route, body, headers, signed_at, now=now, guarded=False)
    if len(_routes) >= SECRET_CACHE_MAX:
        _routes.clear()
    _routes[route_key] = (time.monotonic() + SECRET_CACHE_TTL, route, secret)
    return received


def _store(conn: Connection, route: Route, body: bytes, headers: Mapping[str, str],
           signed_at: int, *, now: datetime, guarded: bool) -> Received | None:
    """Store a verified delivery; None if ``guarded`` and the route changed."""
    event_id, event_type, _ = _envelope(body)
    values = {"operator_id": route.operator_id, "subscription_id": route.subscription_id,
              "event_id": event_id, "event_type": event_type,
              "signed_at": datetime.fromtimestamp(signed_at, UTC), "received_at": now,
              "body": body.decode("utf-8"),
              "headers": {name: headers[name] for name in KEPT_HEADERS if name in headers},
              "status": InboxStatus.PENDING, "deliveries": 1, "attempts": 0}
    if guarded:
        values.update(route_subscription_id=route.subscription_id,
                      route_secret_ct=route.secret_ct, route_wrapped_key=route.wrapped_key,
                      route_now=now)
    # On the receiver's autocommit connection the insert is the commit.
    failpoints.reach("webhook_before_commit")
    row = conn.execute(_store_statement(conn.dialect.name, guarded=guarded), values).first()
    if row is None:
        return None
    duplicate = row.deliveries > 1
    if not duplicate:
        last = _marked.get(route.subscription_id) or route.last_delivery_at
        if last is None or now - last > DELIVERY_MARK_EVERY:
            # Coarse on purpose: one write a minute per subscription and process.
            conn.execute(_MARK_DELIVERY, {"sub_id": route.subscription_id, "now": now,
                                          "cutoff": now - DELIVERY_MARK_EVERY})
            _marked[route.subscription_id] = now
    return Received(event_row_id=row.id, operator_id=route.operator_id, duplicate=duplicate)


# Longer than any job may run (RQ's default timeout is 180 s): an older claim is dead
# whoever holds it. A re-delivery of the holding job does not wait for it (see Holder).
CLAIM_LEASE = timedelta(minutes=5)


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: an RQ job id and its delivery number (0 for the first run,
    growing with each re-delivery), or no job at all (a direct call)."""

    job_id: str | None = None
    delivery: int = 0


@dataclass(frozen=True)
class Claimed:
    """A claimed event: what its handler needs."""

    id: int
    operator_id: int
    event_type: str
    body: str


_CLAIMED = (WebhookEvent.id, WebhookEvent.operator_id, WebhookEvent.event_type,
            WebhookEvent.body)


class ClaimLost(Exception):
    """The claim passed to someone else (a lapsed lease); this holder must not settle."""


def _held_by(holder: Holder):
    return and_(WebhookEvent.status == InboxStatus.PROCESSING,
                WebhookEvent.claimed_by.is_(None) if holder.job_id is None
                else WebhookEvent.claimed_by == holder.job_id,
                WebhookEvent.claim_delivery == holder.delivery)


def _taken_over(holder: Holder):
    """A claim an earlier delivery of this same job left behind: RQ delivers a job again
    only once the earlier delivery has ended or was declared dead, so it is ours now."""
    return and_(WebhookEvent.status == InboxStatus.PROCESSING,
                WebhookEvent.claimed_by == holder.job_id,
                or_(WebhookEvent.claim_delivery.is_(None),
                    WebhookEvent.claim_delivery < holder.delivery))


def _claim_values(holder: Holder, now: datetime) -> dict[str, Any]:
    return {"status": InboxStatus.PROCESSING, "attempts": WebhookEvent.attempts + 1,
            "claimed_at": now, "claimed_by": holder.job_id, "claim_delivery": holder.delivery}


def claim(event_id: int, *, now: datetime, holder: Holder = Holder(),
          replay: bool = False) -> Claimed | None:
    """Move one event to ``processing`` for ``holder`` if nobody else is working on it.
    None = not ours.

    Claimable: pending or failed (``replay`` adds processed and ignored), a claim left by
    an earlier delivery of the holder's own job, or any claim older than CLAIM_LEASE.
    """
    allowed = [InboxStatus.PENDING, InboxStatus.FAILED]
    if replay:
        allowed += [InboxStatus.PROCESSED, InboxStatus.IGNORED]
    takeover = [and_(WebhookEvent.status == InboxStatus.PROCESSING,
                     WebhookEvent.claimed_at < now - CLAIM_LEASE)]
    if holder.job_id is not None:
        takeover.append(_taken_over(holder))
    row = db.session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == event_id,
               or_(WebhookEvent.status.in_(allowed), *takeover))
        .values(_claim_values(holder, now)).returning(*_CLAIMED)
        .execution_options(synchronize_session=False)).first()
    return Claimed(*row) if row is not None else None


def claim_batch(holder: Holder, *, now: datetime, limit: int) -> list[Claimed]:
    """Claim up to ``limit`` events for ``holder``, oldest first: first those an earlier
    delivery of its job left behind, then pending ones. Concurrent drains never claim
    the same event (PostgreSQL skips rows another drain is claiming; SQLite has one
    writer). Returns the claimed events in id order."""
    claimed: list[Claimed] = []
    conditions = [WebhookEvent.status == InboxStatus.PENDING]
    if holder.job_id is not None and holder.delivery > 0:
        conditions.insert(0, _taken_over(holder))
    for condition in conditions:
        wanted = limit - len(claimed)
        if wanted <= 0:
            break
        candidates = (select(WebhookEvent.id).where(condition).order_by(WebhookEvent.id)
                      .limit(wanted).with_for_update(skip_locked=True))
        claimed += [Claimed(*row) for row in db.session.execute(
            update(WebhookEvent).where(WebhookEvent.id.in_(candidates), condition)
            .values(_claim_values(holder, now)).returning(*_CLAIMED)
            .execution_options(synchronize_session=False))]
    return sorted(claimed, key=lambda event: event.id)


def settle(event_ids: Sequence[int], holder: Holder, status: InboxStatus, *,
           now: datetime, error: str | None = None) -> None:
    """End ``holder``'s claims on ``event_ids`` with ``status``, in the transaction of
    the handlers' effects (so both commit or neither). Raises ClaimLost if any of them
    is no longer held."""
    if not event_ids:
        return
    values: dict[str, Any] = {"status": status, "last_error": error,
                              "claimed_by": None, "claim_delivery": None}
    if status == InboxStatus.FAILED:
        values["claimed_at"] = None
    else:
        values["processed_at"] = now
    result = db.session.execute(
        update(WebhookEvent).where(WebhookEvent.id.in_(event_ids), _held_by(holder))
        .values(values).execution_options(synchronize_session=False))
    if result.rowcount != len(event_ids):
        raise ClaimLost(f"events {list(event_ids)} are no longer all held by {holder}")


def stale(*, now: datetime, pending_for: timedelta, limit: int) -> list[int]:
    """Events whose processing never started, or whose claim expired (the outbox gap)."""
    return list(db.session.scalars(
        select(WebhookEvent.id)
        .where(or_(and_(WebhookEvent.status == InboxStatus.PENDING,
                        WebhookEvent.received_at < now - pending_for),
                   and_(WebhookEvent.status == InboxStatus.PROCESSING,
                        WebhookEvent.claimed_at < now - CLAIM_LEASE)))
        .order_by(WebhookEvent.id).limit(limit)))
