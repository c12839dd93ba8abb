"""Per-operator webhook subscriptions: what should exist at Stora, and the reconciler
that makes Stora match it.

Desired state: every connected (active or degraded) operator has one *active*
subscription, a Stora endpoint with the URL ``{PUBLIC_BASE_URL}/webhooks/stora/{route
key}`` and the event types of ``settings.webhook_event_types``, whose secret we hold
encrypted. ``reconcile_operator`` compares and repairs, one concern per step:

1. retiring subscriptions past ``retire_after`` are disabled at Stora;
2. the active subscription's endpoint is fetched: missing → created again; disabled →
   enabled again, or replaced when Stora will not enable it; another URL or other event
   types → ``PATCH``. A missing or disabled endpoint may have lost deliveries beyond
   Stora's retries, so an orders backfill starts for the operator;
3. an operator with neither an active nor a pending subscription gets a pending one;
4. pending subscriptions are created at Stora; the one that becomes active retires the
   previous active one, which keeps verifying for ROTATION_OVERLAP;
5. enabled endpoints that deliver to our receiver but belong to no live subscription are
   disabled: nobody can verify what they send (a create whose answer was lost beyond
   the replay window, an operator who reconnected after needs_reauth).

Creating is safe to repeat. The pending row is committed before the ``POST``, which
carries the row's ``create_idempotency_key``: Stora replays its stored answer, secret
included, for 24 h, so a retry after a lost answer gets the same endpoint. The secret
is encrypted and stored in the transaction that marks the row active. When the key may
be older than Stora's window, the endpoints already created for this subscription are
disabled (their secret is lost with the answer) and a new key creates a fresh one. A key
that Stora answered with a server error is replaced as well: Stora would replay that
error for 24 h.

Concurrency: each state change is a compare-and-swap on ``version`` (the loser stops
with :class:`Superseded`), and a pending row is inserted under the operator's row lock,
so two reconcilers never insert two, and both send the row's one idempotency key: Stora
creates one endpoint and replays it to the other (or answers 409 while the first is in
flight, which is retried).

Transactions: the token source may commit or roll back the session around a Stora call
(a refreshed token must be durable before its use), so every change here is committed
before the next call, and no unit of work stays open across one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select, update

from partner_app.connections.credentials import (
    NeedsReauth,
    NotConnected,
    cipher_for_key,
    live_data_key,
)
from partner_app.connections.jobs import client_for
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db, utcnow
from partner_app.security.vault import VaultError
from partner_app.settings import Settings
from partner_app.stora.client import API_VERSION, StoraClient
from partner_app.stora.errors import (
    ApiUnavailable,
    Forbidden,
    NotFound,
    RequestRejected,
    StoraError,
    Unauthorized,
)
from partner_app.sync.models import RunStatus, SyncRun
from partner_app.sync.services import start_sync
from partner_app.webhooks.inbox import SECRET_COLUMN, SECRET_TABLE, subscription_secret
from partner_app.webhooks.models import SubscriptionStatus, WebhookSubscription, new_route_key

log = logging.getLogger(__name__)

ENDPOINTS = "webhook_endpoints"
RECEIVER_PATH = "/webhooks/stora/"
ENDPOINT_NAME = "Partner platform"
ENDPOINT_DESCRIPTION = "Managed by the partner platform; changes here are reverted."
MANAGED_BY = "partner-platform"
# How long a superseded subscription keeps verifying after its successor is active:
# deliveries Stora already queued for it (and its retries) still get through.
ROTATION_OVERLAP = timedelta(hours=1)
# Stora keeps an idempotent answer for 24 h; an hour of margin for clock differences.
REPLAY_WINDOW = timedelta(hours=23)
BACKFILL_REQUESTER = "webhooks-reconciler"
CONNECTED = (OperatorStatus.ACTIVE, OperatorStatus.DEGRADED)
# Statuses whose endpoint may still be enabled at Stora.
OPEN = (SubscriptionStatus.PENDING, SubscriptionStatus.ACTIVE, SubscriptionStatus.RETIRING)
PAGE_LIMIT = 100
ROUTE_KEY_SHOWN = 6


class Superseded(Exception):
    """Another reconciler changed the subscription first; this pass stops."""


class CreateInProgress(StoraError):
    """Stora is still processing a create with our idempotency key (409): retry later."""

    retryable = True


@dataclass(frozen=True)
class _Row:
    """A snapshot of one subscription, read in a transaction that has since ended."""

    id: int
    operator_id: int
    version: int
    status: str
    route_key: str
    url: str
    event_types: tuple[str, ...]
    stora_endpoint_id: str | None
    create_idempotency_key: str
    retire_after: datetime | None
    created_at: datetime


@dataclass
class Report:
    """What one reconcile pass did, for the job result, the CLI and the log."""

    operator_id: int
    actions: list[str] = field(default_factory=list)
    backfill_run_id: int | None = None

    def note(self, action: str) -> None:
        self.actions.append(action)
        log.info("webhooks.reconcile", extra={"operator_id": self.operator_id,
                                              "action": action})

    def as_dict(self) -> dict[str, Any]:
        return {"operator_id": self.operator_id, "actions": list(self.actions),
                "backfill_run_id": self.backfill_run_id}


# -- small pure helpers --------------------------------------------------------------------
def receiver_url(settings: Settings, route_key: str) -> str:
    """Where Stora delivers for a subscription (the route key names it)."""
    return f"{settings.public_base_url.rstrip('/')}{RECEIVER_PATH}{route_key}"


def display_url(url: str) -> str:
    """The URL with its route key cut to its first characters: the key is a bearer
    credential of sorts (it selects the secret a delivery is checked against)."""
    base, sep, key = url.rpartition(RECEIVER_PATH)
    if not sep:
        return url
    return f"{base}{sep}{key[:ROUTE_KEY_SHOWN]}…"


def new_idempotency_key(now: datetime) -> str:
    """A create key that starts with its issue time (Unix seconds), so the reconciler
    can tell whether Stora may still replay the answer it stored under it."""
    return f"{int(now.timestamp())}.{secrets.token_hex(16)}"


def key_issued_at(row: _Row) -> datetime:
    """When the row's idempotency key was issued (the model's default key: with the row)."""
    head, sep, _ = row.create_idempotency_key.partition(".")
    if sep and head.isdigit():
        return datetime.fromtimestamp(int(head), UTC)
    return row.created_at


def _settings() -> Settings:
    return current_app.extensions["settings"]


def describe_error(exc: BaseException) -> str:
    """Safe to store and log: the error class, status, Stora code and request id only
    (messages and bodies may echo request input, such as our URL)."""
    if isinstance(exc, StoraError):
        parts = [type(exc).__name__, str(exc.status or ""), exc.code or ""]
        if exc.request_id:
            parts.append(f"request {exc.request_id}")
        return " ".join(part for part in parts if part)[:500]
    return type(exc).__name__


def _points_at_us(endpoint: dict[str, Any], settings: Settings) -> bool:
    url = endpoint.get("url")
    prefix = f"{settings.public_base_url.rstrip('/')}{RECEIVER_PATH}"
    return isinstance(url, str) and url.startswith(prefix)


# -- reading and writing rows ----------------------------------------------------------------
def _snapshot(sub: WebhookSubscription) -> _Row:
    return _Row(id=sub.id, operator_id=sub.operator_id, version=sub.version,
                status=sub.status, route_key=sub.route_key, url=sub.url,
                event_types=tuple(sub.event_types or ()),
                stora_endpoint_id=sub.stora_endpoint_id,
                create_idempotency_key=sub.create_idempotency_key,
                retire_after=sub.retire_after, created_at=sub.created_at)


def _rows(operator_id: int, *statuses: str, newest_first: bool = False) -> list[_Row]:
    """Snapshots of the operator's subscriptions in ``statuses``; ends the read."""
    order = WebhookSubscription.id.desc() if newest_first else WebhookSubscription.id
    rows = [_snapshot(sub) for sub in db.session.scalars(
        select(WebhookSubscription)
        .where(WebhookSubscription.operator_id == operator_id,
               WebhookSubscription.status.in_(statuses))
        .order_by(order).execution_options(populate_existing=True))]
    db.session.commit()
    return rows


_SNAPSHOT_FIELDS = frozenset(_Row.__dataclass_fields__)


def _cas(row: _Row, **values: Any) -> _Row:
    """Change the row if nobody changed it since the snapshot (flush only). Returns the
    new snapshot. Raises Superseded."""
    result = db.session.execute(
        update(WebhookSubscription)
        .where(WebhookSubscription.id == row.id, WebhookSubscription.version == row.version)
        .values(version=WebhookSubscription.version + 1, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        db.session.rollback()
        raise Superseded(f"subscription {row.id} moved past v{row.version}")
    known = {name: value for name, value in values.items() if name in _SNAPSHOT_FIELDS}
    if "event_types" in known:
        known["event_types"] = tuple(known["event_types"])
    return replace(row, version=row.version + 1, **known)


def _note_error(row: _Row, error: str) -> None:
    """Record a problem on the row (advisory: no version change) and commit."""
    db.session.execute(update(WebhookSubscription).where(WebhookSubscription.id == row.id)
                       .values(last_error=error[:500])
                       .execution_options(synchronize_session=False))
    db.session.commit()


def _lock_operator(operator_id: int) -> None:
    """Take the operator's row lock (PostgreSQL) or the write lock (SQLite) until commit,
    so deciding "no subscription yet" and inserting one is one step for one operator.

    Called at the start of a transaction: SQLite then reads after taking the lock and
    sees what the previous holder committed.
    """
    db.session.commit()
    db.session.execute(update(Operator).where(Operator.id == operator_id)
                       .values(updated_at=Operator.updated_at)
                       .execution_options(synchronize_session=False))


def _insert_pending(operator_id: int) -> int:
    """A new pending subscription with its own route key and idempotency key (flush)."""
    settings = _settings()
    route_key = new_route_key()
    sub = WebhookSubscription(
        operator_id=operator_id, route_key=route_key, status=SubscriptionStatus.PENDING,
        url=receiver_url(settings, route_key),
        event_types=list(settings.webhook_event_types),
        create_idempotency_key=new_idempotency_key(utcnow()), version=1)
    db.session.add(sub)
    db.session.flush()
    return sub.id


def close_locally(operator_id: int, *, reason: str) -> int:
    """Mark every open or failed subscription of the operator disabled and forget their
    secrets (flush only; no Stora call). Returns how many changed."""
    return db.session.execute(
        update(WebhookSubscription)
        .where(WebhookSubscription.operator_id == operator_id,
               WebhookSubscription.status.in_((*OPEN, SubscriptionStatus.FAILED)))
        .values(status=SubscriptionStatus.DISABLED, secret_ct=None, last_error=reason[:500],
                version=WebhookSubscription.version + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)).rowcount


def close_disconnected() -> int:
    """``close_locally`` for every operator that is no longer connected (commits)."""
    not_connected = select(Operator.id).where(Operator.status.not_in(CONNECTED))
    closed = db.session.execute(
        update(WebhookSubscription)
        .where(WebhookSubscription.operator_id.in_(not_connected),
               WebhookSubscription.status.in_((*OPEN, SubscriptionStatus.FAILED)))
        .values(status=SubscriptionStatus.DISABLED, secret_ct=None,
                last_error="operator not connected", version=WebhookSubscription.version + 1,
                updated_at=utcnow())
        .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    return closed


# -- Stora calls -----------------------------------------------------------------------------
def _list_endpoints(client: StoraClient, **params: str) -> list[dict[str, Any]]:
    """Every endpoint the operator's token can see matching ``params``, all pages.

    Read completely before anything is changed: disabling while paging through a
    ``status=enabled`` list would shift the pages under us.
    """
    found: list[dict[str, Any]] = []
    page = 1
    while True:
        body = client.request("GET", ENDPOINTS,
                              params={"page": page, "limit": PAGE_LIMIT, **params})
        items = body.get("endpoints")
        if not isinstance(items, list):
            raise ApiUnavailable(f"GET {ENDPOINTS}: envelope has no 'endpoints' list")
        found += [item for item in items if isinstance(item, dict)]
        nxt = ((body.get("meta") or {}).get("pagination") or {}).get("next")
        if not isinstance(nxt, int) or isinstance(nxt, bool) or nxt <= page:
            return found
        page = nxt


def _show(client: StoraClient, endpoint_id: str) -> dict[str, Any]:
    endpoint = client.request("GET", f"{ENDPOINTS}/{endpoint_id}").get("endpoint")
    if not isinstance(endpoint, dict):
        raise ApiUnavailable(f"GET {ENDPOINTS}/…: envelope has no 'endpoint'")
    return endpoint


def _disable_endpoint(client: StoraClient, endpoint_id: str) -> bool:
    """Disable at Stora; False if Stora no longer has it (nothing left to stop)."""
    try:
        client.request("POST", f"{ENDPOINTS}/{endpoint_id}/disable")
    except NotFound:
        return False
    return True


def _enable_endpoint(client: StoraClient, endpoint_id: str) -> bool:
    """Enable again; False when Stora will not (the enable call is not documented, so
    a 404 for the route is expected) or no longer has the endpoint."""
    try:
        client.request("POST", f"{ENDPOINTS}/{endpoint_id}/enable")
    except (NotFound, Forbidden, RequestRejected):
        return False
    return True


def _create_body(row: _Row) -> dict[str, Any]:
    """The create request. Built from the row alone, so every retry sends the same body
    under the same idempotency key."""
    return {"name": ENDPOINT_NAME, "api_version": API_VERSION, "url": row.url,
            "event_types": list(row.event_types), "description": ENDPOINT_DESCRIPTION,
            "metadata": {"subscription_id": str(row.id), "managed_by": MANAGED_BY}}


# -- gap recovery ---------------------------------------------------------------------------
def _start_backfill(operator_id: int, report: Report) -> None:
    """Start an orders sync for the operator (flush; the caller commits), unless one the
    reconciler started is still running. The sync cursor makes it incremental."""
    running = db.session.scalar(
        select(SyncRun.id).where(SyncRun.operator_id == operator_id,
                                 SyncRun.requested_by == BACKFILL_REQUESTER,
                                 SyncRun.status == RunStatus.RUNNING).limit(1))
    if running is not None:
        report.backfill_run_id = running
        return
    run = start_sync("orders", requested_by=BACKFILL_REQUESTER, operator_id=operator_id)
    report.backfill_run_id = run.id
    report.note(f"started orders backfill run {run.id}")


# -- the reconcile steps ----------------------------------------------------------------------
def _retire_due(client: StoraClient, operator_id: int, report: Report) -> None:
    """Disable retiring subscriptions whose overlap is over."""
    now = utcnow()
    for row in _rows(operator_id, SubscriptionStatus.RETIRING):
        if row.retire_after is not None and row.retire_after > now:
            continue
        if row.stora_endpoint_id:
            try:
                _disable_endpoint(client, row.stora_endpoint_id)
            except (Forbidden, RequestRejected) as exc:
                _note_error(row, f"could not disable at Stora: {describe_error(exc)}")
                continue
        _cas(row, status=SubscriptionStatus.DISABLED, secret_ct=None, last_error=None,
             last_reconciled_at=now)
        db.session.commit()
        report.note(f"retired subscription {row.id}")


def _secret_readable(row: _Row) -> bool:
    sub = db.session.get(WebhookSubscription, row.id)
    try:
        return sub is not None and sub.data_key_id is not None and bool(
            subscription_secret(sub, vault=current_app.extensions["vault"]))
    except VaultError:
        return False
    finally:
        db.session.commit()


def _check_active(client: StoraClient, operator_id: int, report: Report) -> None:
    """Compare the active subscription's endpoint with what it should be; repair."""
    actives = _rows(operator_id, SubscriptionStatus.ACTIVE, newest_first=True)
    if not actives:
        return
    for extra in actives[1:]:  # only one may be active; the newest stays
        _cas(extra, status=SubscriptionStatus.RETIRING, retire_after=utcnow() + ROTATION_OVERLAP)
        db.session.commit()
        report.note(f"retiring extra active subscription {extra.id}")
    row = actives[0]
    if not _secret_readable(row):
        # E.g. its data key was rotated away: no delivery to it can be verified any more.
        _replace(row, report, reason="secret unreadable; replaced")
        return
    if row.stora_endpoint_id is None:
        _recreate(row, report)
        return
    try:
        endpoint = _show(client, row.stora_endpoint_id)
    except NotFound:
        _recreate(row, report)
        return
    except (Forbidden, RequestRejected) as exc:
        # Stora may well still deliver to it: keep it active, show the problem.
        _note_error(row, f"could not check at Stora: {describe_error(exc)}")
        return
    if endpoint.get("status") != "enabled":
        if _enable_endpoint(client, row.stora_endpoint_id):
            _cas(row, last_error=None, last_reconciled_at=utcnow())
            _start_backfill(operator_id, report)
            db.session.commit()
            report.note(f"enabled endpoint {row.stora_endpoint_id} again")
        else:
            _replace(row, report, reason="disabled at Stora; replaced")
        return
    _repair_drift(client, row, endpoint, report)


def _recreate(row: _Row, report: Report) -> None:
    """Stora has no endpoint for an active row: make it pending with a new key."""
    _cas(row, status=SubscriptionStatus.PENDING, stora_endpoint_id=None, secret_ct=None,
         data_key_id=None, create_idempotency_key=new_idempotency_key(utcnow()),
         last_error="endpoint missing at Stora; creating it again")
    _start_backfill(row.operator_id, report)
    db.session.commit()
    report.note(f"endpoint of subscription {row.id} missing at Stora; creating it again")


def _replace(row: _Row, report: Report, *, reason: str) -> None:
    """Start a successor, which retires ``row`` once it is active, and a backfill for
    what Stora could not deliver meanwhile. No second successor while one is pending,
    nor after one failed (it would fail again; see its last_error)."""
    _lock_operator(row.operator_id)
    pending = _rows_in_tx(row.operator_id, SubscriptionStatus.PENDING)
    failed = [sub_id for sub_id in _rows_in_tx(row.operator_id, SubscriptionStatus.FAILED)
              if sub_id > row.id]
    if not pending and not failed:
        new_id = _insert_pending(row.operator_id)
        report.note(f"subscription {row.id} {reason} by {new_id}")
    _start_backfill(row.operator_id, report)
    db.session.execute(update(WebhookSubscription).where(WebhookSubscription.id == row.id)
                       .values(last_error=reason).execution_options(synchronize_session=False))
    db.session.commit()


def _rows_in_tx(operator_id: int, *statuses: str) -> list[int]:
    """Ids in ``statuses``, read inside the current transaction (under the lock)."""
    return list(db.session.scalars(select(WebhookSubscription.id).where(
        WebhookSubscription.operator_id == operator_id,
        WebhookSubscription.status.in_(statuses))))


def _repair_drift(client: StoraClient, row: _Row, endpoint: dict[str, Any],
                  report: Report) -> None:
    """PATCH the URL and event types back to what they should be, if they moved."""
    settings = _settings()
    wanted_url = receiver_url(settings, row.route_key)
    wanted_types = list(settings.webhook_event_types)
    changes: dict[str, Any] = {}
    if endpoint.get("url") != wanted_url:
        changes["url"] = wanted_url
    if sorted(endpoint.get("event_types") or []) != sorted(wanted_types):
        changes["event_types"] = wanted_types
    if changes:
        try:
            client.request("PATCH", f"{ENDPOINTS}/{row.stora_endpoint_id}", json=changes)
        except (Forbidden, RequestRejected, NotFound) as exc:
            _note_error(row, f"could not update at Stora: {describe_error(exc)}")
            return
        report.note(f"updated {', '.join(sorted(changes))} of endpoint {row.stora_endpoint_id}")
    _cas(row, url=wanted_url, event_types=wanted_types, last_error=None,
         last_reconciled_at=utcnow())
    db.session.commit()


def _ensure_wanted(operator_id: int, report: Report, *, retry_failed: bool) -> None:
    """Insert a pending subscription if the operator has neither an active nor a pending
    one. A failed one blocks this (it would fail again) unless ``retry_failed``."""
    _lock_operator(operator_id)
    present = db.session.execute(
        select(WebhookSubscription.id, WebhookSubscription.status)
        .where(WebhookSubscription.operator_id == operator_id)).all()
    statuses = {status for _, status in present}
    if statuses & {SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING}:
        db.session.commit()
        return
    failed = [sub_id for sub_id, status in present if status == SubscriptionStatus.FAILED]
    if failed and not retry_failed:
        db.session.commit()
        report.note(f"subscription {failed[-1]} failed; see its last_error")
        return
    if failed:
        db.session.execute(update(WebhookSubscription)
                           .where(WebhookSubscription.id.in_(failed))
                           .values(status=SubscriptionStatus.DISABLED,
                                   version=WebhookSubscription.version + 1)
                           .execution_options(synchronize_session=False))
    new_id = _insert_pending(operator_id)
    if present:
        # It had subscriptions, and none is live: deliveries in between were refused.
        _start_backfill(operator_id, report)
    db.session.commit()
    report.note(f"created pending subscription {new_id}")


def _create_pending(client: StoraClient, operator_id: int, report: Report) -> None:
    for row in _rows(operator_id, SubscriptionStatus.PENDING):
        _create(client, row, report)


def _create(client: StoraClient, row: _Row, report: Report) -> None:
    """Create the endpoint for a pending row and make the row active with its secret."""
    if utcnow() - key_issued_at(row) > REPLAY_WINDOW:
        row = _abandon_key(client, row, report)
    try:
        body = client.request("POST", ENDPOINTS, json=_create_body(row),
                              idempotency_key=row.create_idempotency_key)
    except ApiUnavailable as exc:
        if exc.status is not None and exc.status >= 500:
            # Stora answered, and replays that answer to this key for 24 h.
            _cas(row, create_idempotency_key=new_idempotency_key(utcnow()),
                 last_error=f"create failed: {describe_error(exc)}")
            db.session.commit()
        else:  # no answer (or an unreadable one): the same key gets Stora's stored answer
            _note_error(row, f"create in doubt: {describe_error(exc)}")
        raise
    except RequestRejected as exc:
        if exc.status == 409:
            _note_error(row, f"create in progress: {describe_error(exc)}")
            raise CreateInProgress("create still in progress at Stora", status=409,
                                   code=exc.code, request_id=exc.request_id) from exc
        _fail(row, exc, report)
        return
    except (Forbidden, NotFound) as exc:
        _fail(row, exc, report)
        return
    endpoint = body.get("endpoint") if isinstance(body.get("endpoint"), dict) else {}
    endpoint_id, secret = endpoint.get("id"), endpoint.get("secret")
    if not isinstance(endpoint_id, str) or not isinstance(secret, str) or not secret:
        if isinstance(endpoint_id, str):
            _disable_endpoint(client, endpoint_id)
        _cas(row, create_idempotency_key=new_idempotency_key(utcnow()),
             last_error="create answered without a secret")
        db.session.commit()
        raise ApiUnavailable(f"POST {ENDPOINTS}: answer without id or secret")
    _activate(row, endpoint_id, secret, report)


def _abandon_key(client: StoraClient, row: _Row, report: Report) -> _Row:
    """The key may be past Stora's window: an endpoint created under it cannot be
    replayed any more, so nobody will ever hold its secret. Disable such endpoints and
    issue a new key. Matched on the exact URL, which carries the row's random route key."""
    for endpoint in _list_endpoints(client, **{"metadata[subscription_id]": str(row.id)}):
        if endpoint.get("url") == row.url and endpoint.get("status") == "enabled":
            _disable_endpoint(client, endpoint["id"])
            report.note(f"disabled endpoint {endpoint['id']} (secret lost with its answer)")
    row = _cas(row, create_idempotency_key=new_idempotency_key(utcnow()))
    db.session.commit()
    return row


def _fail(row: _Row, exc: StoraError, report: Report) -> None:
    _cas(row, status=SubscriptionStatus.FAILED,
         last_error=f"create rejected: {describe_error(exc)}", last_reconciled_at=utcnow())
    db.session.commit()
    report.note(f"subscription {row.id} failed: {describe_error(exc)}")


def _activate(row: _Row, endpoint_id: str, secret: str, report: Report) -> None:
    """Store the secret encrypted and mark the row active in one transaction; the
    previous active subscription starts retiring."""
    operator = db.session.get(Operator, row.operator_id, populate_existing=True)
    if operator is None or operator.status not in CONNECTED:
        # Disconnected meanwhile: its keys are shredded; never make a new one for it.
        db.session.rollback()
        raise NotConnected(f"operator {row.operator_id} is no longer connected")
    vault = current_app.extensions["vault"]
    key = live_data_key(operator, vault=vault)
    ciphertext = cipher_for_key(key, vault=vault).encrypt(SECRET_TABLE, SECRET_COLUMN, secret)
    now = utcnow()
    _cas(row, status=SubscriptionStatus.ACTIVE, stora_endpoint_id=endpoint_id,
         secret_ct=ciphertext, data_key_id=key.id, last_error=None, last_reconciled_at=now)
    retiring = db.session.execute(
        update(WebhookSubscription)
        .where(WebhookSubscription.operator_id == row.operator_id,
               WebhookSubscription.id != row.id,
               WebhookSubscription.status == SubscriptionStatus.ACTIVE)
        .values(status=SubscriptionStatus.RETIRING, retire_after=now + ROTATION_OVERLAP,
                version=WebhookSubscription.version + 1, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    report.note(f"subscription {row.id} active with endpoint {endpoint_id}"
                + (f"; {retiring} retiring" if retiring else ""))


def _disable_strays(client: StoraClient, operator_id: int, report: Report) -> None:
    """Disable enabled endpoints that deliver to our receiver for no live subscription."""
    live = {row.stora_endpoint_id for row in _rows(
        operator_id, SubscriptionStatus.ACTIVE, SubscriptionStatus.RETIRING)}
    pending = {str(row.id) for row in _rows(operator_id, SubscriptionStatus.PENDING)}
    settings = _settings()
    for endpoint in _list_endpoints(client, status="enabled"):
        tag = str((endpoint.get("metadata") or {}).get("subscription_id", ""))
        if endpoint.get("id") in live or tag in pending or not _points_at_us(endpoint, settings):
            continue
        _disable_endpoint(client, endpoint["id"])
        report.note(f"disabled stray endpoint {endpoint['id']}")


# -- entry points -------------------------------------------------------------------------------
def _operator_status(operator_id: int) -> str | None:
    status = db.session.scalar(select(Operator.status).where(Operator.id == operator_id))
    db.session.commit()
    return status


def reconcile_operator(operator_id: int, *, retry_failed: bool = False) -> dict[str, Any]:
    """Make Stora match the desired state for one operator; returns what was done.

    Needs an application context. Raises what is worth retrying later: retryable
    ``StoraError`` (ApiUnavailable, RateLimited, RateLimitWait, CreateInProgress) and
    retryable ``CredentialError``. Permanent Stora answers are recorded on the row they
    concern. An operator that is not (or no longer) connected only has its rows closed.
    """
    report = Report(operator_id)
    status = _operator_status(operator_id)
    if status is None:
        report.note("no such operator")
        return report.as_dict()
    if status not in CONNECTED:
        _close(operator_id, report, reason=f"operator is {status}")
        return report.as_dict()
    client = client_for(operator_id)
    try:
        _retire_due(client, operator_id, report)
        _check_active(client, operator_id, report)
        _ensure_wanted(operator_id, report, retry_failed=retry_failed)
        _create_pending(client, operator_id, report)
        _disable_strays(client, operator_id, report)
    except Superseded:
        db.session.rollback()
        report.note("stopped: a concurrent reconciler changed a subscription first")
    except (NeedsReauth, NotConnected, Unauthorized):
        db.session.rollback()
        status = _operator_status(operator_id)
        if status in CONNECTED:
            raise
        _close(operator_id, report, reason=f"operator is {status}")
    return report.as_dict()


def _close(operator_id: int, report: Report, *, reason: str) -> None:
    closed = close_locally(operator_id, reason=reason)
    db.session.commit()
    if closed:
        report.note(f"closed {closed} subscription(s) locally: {reason}")


def rotate_secret(operator_id: int) -> dict[str, Any]:
    """Replace the operator's subscription with a new one (new route key, endpoint and
    secret). The old one keeps verifying its own deliveries for ROTATION_OVERLAP, then
    is disabled; duplicates across the two are absorbed by the inbox. A rotation already
    in progress (a pending subscription) is completed rather than started again.
    """
    report = Report(operator_id)
    status = _operator_status(operator_id)
    if status not in CONNECTED:
        report.note(f"not rotated: operator is {status or 'unknown'}")
        return report.as_dict()
    _lock_operator(operator_id)
    if not _rows_in_tx(operator_id, SubscriptionStatus.PENDING):
        new_id = _insert_pending(operator_id)
        report.note(f"rotation: created pending subscription {new_id}")
    db.session.commit()
    result = reconcile_operator(operator_id)
    return {**result, "actions": report.actions + result["actions"]}


def disable_endpoints_at_stora(operator_id: int) -> int:
    """Before a disconnect: disable at Stora every enabled endpoint of the operator that
    delivers to us, while its token still works. Returns how many were disabled.

    No call is made for an operator that never had a subscription. Errors propagate as
    the client raised them; the disconnect decides what they mean. Commits only what the
    token source commits; local rows are left to ``close_locally``.
    """
    known = db.session.scalars(select(WebhookSubscription.stora_endpoint_id).where(
        WebhookSubscription.operator_id == operator_id)).all()
    if not known:
        return 0
    ours = {endpoint_id for endpoint_id in known if endpoint_id}
    settings = _settings()
    client = client_for(operator_id)
    disabled = 0
    for endpoint in _list_endpoints(client, status="enabled"):
        if endpoint.get("id") in ours or _points_at_us(endpoint, settings):
            disabled += _disable_endpoint(client, endpoint["id"])
    log.info("webhooks.disabled_for_disconnect", extra={"operator_id": operator_id,
                                                        "endpoints": disabled})
    return disabled


# -- reading, for the CLI and the dashboard ------------------------------------------------------
@dataclass(frozen=True)
class SubscriptionView:
    id: int
    operator_public_id: str
    status: str
    display_url: str
    event_types: tuple[str, ...]
    stora_endpoint_id: str | None
    last_reconciled_at: datetime | None
    last_delivery_at: datetime | None
    retire_after: datetime | None
    last_error: str | None


def subscriptions_overview(operator_id: int | None = None,
                           statuses: Iterable[str] | None = None) -> list[SubscriptionView]:
    """Subscriptions with their operator's public id, newest first; route keys cut."""
    stmt = (select(WebhookSubscription, Operator.public_id)
            .join(Operator, Operator.id == WebhookSubscription.operator_id)
            .order_by(WebhookSubscription.operator_id, WebhookSubscription.id.desc()))
    if operator_id is not None:
        stmt = stmt.where(WebhookSubscription.operator_id == operator_id)
    if statuses:
        stmt = stmt.where(WebhookSubscription.status.in_(list(statuses)))
    return [SubscriptionView(
        id=sub.id, operator_public_id=public_id, status=sub.status,
        display_url=display_url(sub.url), event_types=tuple(sub.event_types or ()),
        stora_endpoint_id=sub.stora_endpoint_id, last_reconciled_at=sub.last_reconciled_at,
        last_delivery_at=sub.last_delivery_at, retire_after=sub.retire_after,
        last_error=sub.last_error) for sub, public_id in db.session.execute(stmt)]
