"""Records held by the sandbox store.

Plain mutable dataclasses; they are only read or changed while holding the store lock
(see :mod:`stora_sandbox.store`). Nothing here knows about Flask or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class Application:
    """A registered OAuth client (Doorkeeper's ``oauth_applications`` row)."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    scopes: frozenset[str]
    name: str

    def summary(self) -> dict[str, Any]:
        """JSON view without the secret."""
        return {
            "client_id": self.client_id,
            "name": self.name,
            "redirect_uris": list(self.redirect_uris),
            "scopes": sorted(self.scopes),
        }


@dataclass
class Operator:
    """A Stora operator (the tenant a staff member approves the partner app for)."""

    id: str
    name: str
    subdomain: str
    created_at: float


@dataclass
class Resource:
    """One API record in its wire shape: a site, contact, order, timeline source,
    timeline template or timeline event.

    ``data`` is exactly what the API returns. ``created_at``/``updated_at`` duplicate the
    ISO strings inside ``data`` as datetimes for filtering and sorting, and ``seq`` is the
    insertion order, used as the sort tie-breaker so pagination is stable.
    ``operator_id`` is None for global records (timeline sources and templates every
    operator sees). ``client_id`` names the OAuth application that created the record
    through the API, if one did.
    """

    kind: str
    id: str
    operator_id: str | None
    created_at: datetime
    updated_at: datetime
    seq: int
    data: dict[str, Any]
    client_id: str | None = None


@dataclass
class WebhookEndpoint:
    """A webhook endpoint of one operator.

    ``data`` is the wire shape with ``secret`` always None (Stora returns the secret only
    in the create response); the secret itself is kept apart in ``secret``.
    ``created_at``/``updated_at`` mirror ``data`` as datetimes. ``consecutive_failures``
    counts failed delivery attempts since the last success.
    """

    id: str
    operator_id: str
    client_id: str | None
    secret: str
    created_at: datetime
    updated_at: datetime
    seq: int
    data: dict[str, Any]
    consecutive_failures: int = 0


@dataclass
class IdempotencyEntry:
    """A stored response for one ``Idempotency-Key`` of one application and operator.

    ``status`` is None while the first request is still being processed.
    ``fingerprint`` identifies the request (method, path, body digest).
    """

    fingerprint: str
    created_at: float
    status: int | None = None
    body: bytes = b""
    mimetype: str = "application/json"


@dataclass
class Grant:
    """An authorization code (Doorkeeper's ``oauth_access_grants`` row).

    ``revoked_at`` is set when the code is exchanged; ``token_row_id`` remembers the token
    row it produced so a replay can revoke it (Doorkeeper main, #1865).
    """

    code: str
    client_id: str
    operator_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    code_challenge: str | None
    code_challenge_method: str | None
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    token_row_id: int | None = None


@dataclass
class TokenRow:
    """An access token and its refresh token (Doorkeeper's ``oauth_access_tokens`` row).

    Revoking the row kills both tokens. ``expires_at`` bounds the access token only;
    refresh tokens do not expire (Doorkeeper). ``previous_row_id`` is Doorkeeper's
    ``previous_refresh_token`` column expressed as a row reference: in ``on_use`` mode the
    row it names is revoked the first time this row's access token authenticates.
    ``refresh_token`` is None when the row has none (or it moved to a newer row under the
    ``omit_refresh_token_on_refresh`` switch).
    """

    id: int
    access_token: str
    refresh_token: str | None
    client_id: str
    operator_id: str
    scopes: tuple[str, ...]
    created_at: int
    expires_in: int
    expires_at: float
    revoked_at: float | None = None
    previous_row_id: int | None = None

    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def is_accessible(self, now: float) -> bool:
        """True if the access token may authenticate a request."""
        return not self.is_revoked() and not self.is_expired(now)


@dataclass
class Fault:
    """A queued fault for the next matching requests (see ``POST /_sandbox/faults``).

    ``remaining`` counts down per match; -1 means forever.
    """

    id: int
    endpoint: str
    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    latency_ms: int = 0
    latency_after_commit_ms: int = 0
    mode: str | None = None
    remaining: int = 1
    grant_type: str | None = None
    stored: bool = False
    hits: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "status": self.status,
            "body": self.body,
            "headers": self.headers,
            "latency_ms": self.latency_ms,
            "latency_after_commit_ms": self.latency_after_commit_ms,
            "mode": self.mode,
            "count": self.remaining,
            "grant_type": self.grant_type,
            "stored": self.stored,
            "hits": self.hits,
        }
