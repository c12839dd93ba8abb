"""Thread-safe in-memory state of the sandbox.

The server is threaded, so every read-modify-write goes through ``store.lock`` (an
``RLock``, so helpers can nest). Callers that need several steps to be atomic, such as
the token logic in :mod:`stora_sandbox.tokens`, take the lock themselves; the methods
here take it too, which is harmless under an ``RLock``.

Never sleep or do I/O while holding the lock: latency faults sleep outside it.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

from stora_sandbox.config import STORA_SCOPES, ApplicationSpec, Switches
from stora_sandbox.models import (
    Application,
    Fault,
    Grant,
    IdempotencyEntry,
    Operator,
    Resource,
    TokenRow,
    WebhookEndpoint,
)
from stora_sandbox.ratelimit import RateLimiter

# Kinds of :class:`Resource`; the first three are counted in operator summaries.
SUMMARY_KINDS = ("site", "contact", "order")
RESOURCE_KINDS = (*SUMMARY_KINDS, "timeline_source", "timeline_template", "timeline_event")

# (client_id, operator_id, Idempotency-Key value)
IdempotencyIdentity = tuple[str, str, str]


def new_token() -> str:
    """A fresh opaque token or code (Doorkeeper's default: 32 random bytes, URL-safe)."""
    return secrets.token_urlsafe(32)


def canary_token(kind: str, marker: str, value: str) -> str:
    """``value`` as a secret of ``kind`` carrying ``marker``; ``value`` itself without one."""
    return f"{kind}_{marker}_{value}" if marker else value


class Store:
    """All sandbox state: applications, operators, API records, webhook endpoints,
    grants, tokens, stored idempotent responses, the request log, queued faults, rate
    counters and the current switches.

    ``dispatcher`` (set by :func:`stora_sandbox.create_app`) delivers webhooks; its
    state is separate and cleared by the admin reset.
    """

    def __init__(self, switches: Switches, clock: Callable[[], float], canary: str = "") -> None:
        self.lock = threading.RLock()
        self.canary = canary
        self.clock = clock
        self.initial_switches = switches
        self.switches = switches
        self.applications: dict[str, Application] = {}
        self.dispatcher: Any = None
        self._wipe()

    def _wipe(self) -> None:
        """Drop everything except applications; restore the initial switches."""
        self.switches = self.initial_switches
        self.operators: dict[str, Operator] = {}
        self.resources: dict[str, dict[str, Resource]] = {k: {} for k in RESOURCE_KINDS}
        # The same records by kind and owner (None: global), so listing one operator's
        # records costs its own count, not every operator's.
        self._owned: dict[str, dict[str | None, dict[str, Resource]]] = {
            k: {} for k in RESOURCE_KINDS
        }
        self.webhook_endpoints: dict[str, WebhookEndpoint] = {}
        self.idempotency: dict[IdempotencyIdentity, IdempotencyEntry] = {}
        self.grants: dict[str, Grant] = {}
        self.token_rows: dict[int, TokenRow] = {}
        self.access_index: dict[str, int] = {}
        self.refresh_index: dict[str, int] = {}
        self.request_log: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self._resource_seq = itertools.count(1)
        self._row_ids = itertools.count(1)
        self._request_seq = itertools.count(1)
        self._fault_ids = itertools.count(1)
        self.rate_limiter = RateLimiter()

    def now(self) -> float:
        return self.clock()

    def reset(self) -> None:
        """Wipe all state except registered applications; restore start-up switches."""
        with self.lock:
            self._wipe()

    # -- switches ---------------------------------------------------------------------

    def update_switches(self, changes: dict[str, Any]) -> Switches:
        """Apply ``changes`` atomically. Raises ValueError on bad keys or values."""
        with self.lock:
            self.switches = self.switches.updated(changes)
            return self.switches

    # -- applications -----------------------------------------------------------------

    def upsert_application(self, spec: ApplicationSpec) -> Application:
        """Register or replace the application with ``spec.client_id``."""
        app = Application(
            client_id=spec.client_id,
            client_secret=spec.client_secret,
            redirect_uris=tuple(spec.redirect_uris),
            scopes=frozenset(spec.scopes) or STORA_SCOPES,
            name=spec.name,
        )
        with self.lock:
            self.applications[app.client_id] = app
        return app

    def get_application(self, client_id: str | None) -> Application | None:
        if not client_id:
            return None
        with self.lock:
            return self.applications.get(client_id)

    # -- operators and API records ----------------------------------------------------

    def add_operator(self, operator: Operator) -> None:
        with self.lock:
            self.operators[operator.id] = operator

    def get_operator(self, operator_id: str | None) -> Operator | None:
        if not operator_id:
            return None
        with self.lock:
            return self.operators.get(operator_id)

    def list_operators(self) -> list[Operator]:
        with self.lock:
            return sorted(self.operators.values(), key=lambda o: (o.created_at, o.name))

    def operator_summary(self, operator: Operator) -> dict[str, Any]:
        """JSON view of an operator with per-kind record counts."""
        with self.lock:
            counts = {
                f"{kind}s": len(self._owned[kind].get(operator.id, ()))
                for kind in SUMMARY_KINDS
            }
        return {"id": operator.id, "name": operator.name, "subdomain": operator.subdomain, **counts}

    def next_resource_seq(self) -> int:
        with self.lock:
            return next(self._resource_seq)

    def add_resource(self, resource: Resource) -> None:
        with self.lock:
            replaced = self.resources[resource.kind].get(resource.id)
            if replaced is not None and replaced.operator_id != resource.operator_id:
                self._owned[resource.kind].get(replaced.operator_id, {}).pop(resource.id, None)
            self.resources[resource.kind][resource.id] = resource
            owned = self._owned[resource.kind].setdefault(resource.operator_id, {})
            owned[resource.id] = resource

    def get_resource(self, kind: str, operator_id: str, resource_id: str) -> Resource | None:
        """The record, or None if it does not exist *for this operator*."""
        with self.lock:
            found = self.resources[kind].get(resource_id)
        if found is None or found.operator_id != operator_id:
            return None
        return found

    def list_resources(self, kind: str, operator_id: str) -> list[Resource]:
        with self.lock:
            return list(self._owned[kind].get(operator_id, {}).values())

    def get_visible(self, kind: str, operator_id: str, resource_id: str) -> Resource | None:
        """The record if it is global or belongs to this operator, else None."""
        with self.lock:
            found = self.resources[kind].get(resource_id)
        if found is None or found.operator_id not in (None, operator_id):
            return None
        return found

    def list_visible(self, kind: str, operator_id: str) -> list[Resource]:
        """Global records of ``kind`` plus the operator's own."""
        with self.lock:
            owned = self._owned[kind]
            return [*owned.get(None, {}).values(), *owned.get(operator_id, {}).values()]

    # -- webhook endpoints ------------------------------------------------------------

    def add_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        with self.lock:
            self.webhook_endpoints[endpoint.id] = endpoint

    def get_webhook_endpoint(
        self, endpoint_id: str, operator_id: str | None = None
    ) -> WebhookEndpoint | None:
        """The endpoint, or None if unknown or (given ``operator_id``) another's."""
        with self.lock:
            found = self.webhook_endpoints.get(endpoint_id)
        if found is None or (operator_id is not None and found.operator_id != operator_id):
            return None
        return found

    def list_webhook_endpoints(self, operator_id: str | None = None) -> list[WebhookEndpoint]:
        """Endpoints in creation order, optionally of one operator only."""
        with self.lock:
            found = [
                e
                for e in self.webhook_endpoints.values()
                if operator_id is None or e.operator_id == operator_id
            ]
        return sorted(found, key=lambda e: e.seq)

    # -- idempotency ------------------------------------------------------------------

    def idempotency_begin(
        self, identity: IdempotencyIdentity, fingerprint: str
    ) -> tuple[str, IdempotencyEntry | None]:
        """Claim ``identity`` for a new request, or say why not.

        Returns ``("proceed", None)`` after marking the key as in progress,
        ``("replay", entry)`` for a stored response younger than ``idempotency_ttl``,
        ``("in_progress", None)`` while another request with the key is running, or
        ``("mismatch", entry)`` when the stored request had another fingerprint and the
        ``idempotency_key_reuse`` switch says ``"reject"``.
        """
        with self.lock:
            now = self.now()
            entry = self.idempotency.get(identity)
            if entry is not None and now - entry.created_at >= self.switches.idempotency_ttl:
                entry = None
            if entry is None:
                self.idempotency[identity] = IdempotencyEntry(fingerprint, now)
                return "proceed", None
            if entry.status is None:
                return "in_progress", None
            if entry.fingerprint != fingerprint and self.switches.idempotency_key_reuse == "reject":
                return "mismatch", entry
            return "replay", entry

    def idempotency_finish(
        self, identity: IdempotencyIdentity, status: int, body: bytes, mimetype: str
    ) -> None:
        """Store the response of the request that claimed ``identity``."""
        with self.lock:
            entry = self.idempotency.get(identity)
            if entry is not None and entry.status is None:
                entry.status, entry.body, entry.mimetype = status, body, mimetype

    def idempotency_abandon(self, identity: IdempotencyIdentity) -> None:
        """Release a claim whose request produced nothing to store."""
        with self.lock:
            entry = self.idempotency.get(identity)
            if entry is not None and entry.status is None:
                del self.idempotency[identity]

    # -- grants and token rows --------------------------------------------------------

    def add_grant(self, grant: Grant) -> None:
        with self.lock:
            self.grants[grant.code] = grant

    def add_token_row(
        self,
        *,
        client_id: str,
        operator_id: str,
        scopes: Iterable[str],
        expires_in: int,
        with_refresh_token: bool = True,
        previous_row_id: int | None = None,
    ) -> TokenRow:
        """Create and index a new token row issued now."""
        with self.lock:
            created_at = int(self.now())
            row = TokenRow(
                id=next(self._row_ids),
                access_token=canary_token("at", self.canary, new_token()),
                refresh_token=(canary_token("rt", self.canary, new_token())
                               if with_refresh_token else None),
                client_id=client_id,
                operator_id=operator_id,
                scopes=tuple(scopes),
                created_at=created_at,
                expires_in=expires_in,
                expires_at=created_at + expires_in,
                previous_row_id=previous_row_id,
            )
            self.token_rows[row.id] = row
            self.access_index[row.access_token] = row.id
            if row.refresh_token:
                self.refresh_index[row.refresh_token] = row.id
            return row

    def move_refresh_token(self, source: TokenRow, target: TokenRow) -> None:
        """Hand ``source``'s refresh token to ``target`` (refresh without a new one)."""
        with self.lock:
            token = source.refresh_token
            source.refresh_token = None
            target.refresh_token = token
            if token:
                self.refresh_index[token] = target.id

    def row_by_access_token(self, token: str | None) -> TokenRow | None:
        if not token:
            return None
        with self.lock:
            row_id = self.access_index.get(token)
            return self.token_rows.get(row_id) if row_id is not None else None

    def row_by_refresh_token(self, token: str | None) -> TokenRow | None:
        if not token:
            return None
        with self.lock:
            row_id = self.refresh_index.get(token)
            return self.token_rows.get(row_id) if row_id is not None else None

    def revoke_row(self, row: TokenRow) -> None:
        """Revoke both tokens of ``row`` (idempotent: keeps the first revocation time)."""
        with self.lock:
            if row.revoked_at is None:
                row.revoked_at = self.now()

    def revoke_operator_tokens(self, operator_id: str) -> int:
        """Revoke every live row and unused code of an operator; return rows revoked."""
        with self.lock:
            now = self.now()
            count = 0
            for row in self.token_rows.values():
                if row.operator_id == operator_id and row.revoked_at is None:
                    row.revoked_at = now
                    count += 1
            for grant in self.grants.values():
                if grant.operator_id == operator_id and grant.revoked_at is None:
                    grant.revoked_at = now
            return count

    def expire_operator_access_tokens(self, operator_id: str) -> int:
        """Make every unexpired, unrevoked access token of an operator expire now.

        Refresh tokens are untouched (they never expire), so the client can refresh.
        """
        with self.lock:
            now = self.now()
            count = 0
            for row in self.token_rows.values():
                if row.operator_id == operator_id and row.is_accessible(now):
                    row.expires_at = now
                    count += 1
            return count

    def token_inventory(self) -> list[dict[str, Any]]:
        """Every code, access token and refresh token ever issued, with its state."""
        with self.lock:
            now = self.now()
            items: list[dict[str, Any]] = []
            for grant in self.grants.values():
                if grant.revoked_at is not None:
                    state = "revoked"
                elif now >= grant.expires_at:
                    state = "expired"
                else:
                    state = "active"
                items.append(
                    {
                        "kind": "authorization_code",
                        "value": grant.code,
                        "client_id": grant.client_id,
                        "operator_id": grant.operator_id,
                        "state": state,
                        "created_at": grant.created_at,
                        "expires_at": grant.expires_at,
                    }
                )
            for row in self.token_rows.values():
                if row.is_revoked():
                    state = "revoked"
                elif row.is_expired(now):
                    state = "expired"
                else:
                    state = "active"
                items.append(
                    {
                        "kind": "access_token",
                        "value": row.access_token,
                        "row_id": row.id,
                        "client_id": row.client_id,
                        "operator_id": row.operator_id,
                        "state": state,
                        "created_at": row.created_at,
                        "expires_at": row.expires_at,
                    }
                )
            for token, row_id in self.refresh_index.items():
                row = self.token_rows[row_id]
                items.append(
                    {
                        "kind": "refresh_token",
                        "value": token,
                        "row_id": row.id,
                        "client_id": row.client_id,
                        "operator_id": row.operator_id,
                        "state": "revoked" if row.is_revoked() else "active",
                        "created_at": row.created_at,
                        "expires_at": None,
                    }
                )
            return items

    # -- request log ------------------------------------------------------------------

    def record_request(self, entry: dict[str, Any]) -> int:
        """Append ``entry`` (which must hold no secrets) and return its sequence number."""
        with self.lock:
            seq = next(self._request_seq)
            self.request_log.append({"seq": seq, **entry})
            return seq

    def requests_since(self, since: int) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(e) for e in self.request_log if e["seq"] > since]

    def clear_requests(self) -> None:
        """Empty the log; sequence numbers keep increasing so ``since`` stays valid."""
        with self.lock:
            self.request_log.clear()

    # -- faults -----------------------------------------------------------------------

    def add_fault(self, **fields: Any) -> Fault:
        with self.lock:
            fault = Fault(id=next(self._fault_ids), **fields)
            self.faults.append(fault)
            return fault

    def take_fault(self, endpoint: str, grant_type: str | None) -> Fault | None:
        """Consume one use of the oldest fault matching this request, if any."""
        with self.lock:
            for fault in self.faults:
                if fault.endpoint != endpoint:
                    continue
                if fault.grant_type is not None and fault.grant_type != grant_type:
                    continue
                fault.hits += 1
                if fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self.faults.remove(fault)
                return fault
            return None

    def list_faults(self) -> list[dict[str, Any]]:
        with self.lock:
            return [f.as_dict() for f in self.faults]

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()
