"""Sandbox configuration: start-up settings and the runtime switches.

Two layers:

* :class:`SandboxConfig` is fixed when the app is built: the applications registered at
  start-up, the seed, the public URL and the clock.
* :class:`Switches` holds behaviour that tests flip at runtime through
  ``PATCH /_sandbox/config``. Most switches exist because Stora's exact behaviour is not
  documented (see ``shared/stora-api``), so the sandbox can play either reading and the
  partner platform can be tested against both.

Switches are immutable; an update builds a new instance (:meth:`Switches.updated`) that
the store swaps in under its lock, so a request always sees one consistent set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Every scope Stora documents (shared/stora-api/oauth.md §8). Applications may request any
# of these unless registered with a narrower list.
STORA_SCOPES: frozenset[str] = frozenset(
    {
        "public.access_token:read",
        "public.application:read",
        "public.contact:read",
        "public.contact:write",
        "public.contract:read",
        "public.contract_template:read",
        "public.coupon:read",
        "public.credit_note:read",
        "public.deal:read",
        "public.deal:write",
        "public.deal_stage:read",
        "public.identity_verification:read",
        "public.invoice:read",
        "public.note:read",
        "public.note:write",
        "public.order:read",
        "public.order:write",
        "public.product:read",
        "public.product:write",
        "public.product_category:read",
        "public.protection_level:read",
        "public.protection_level:write",
        "public.site:read",
        "public.staff:read",
        "public.subscription:read",
        "public.task:read",
        "public.task:write",
        "public.tenancy:read",
        "public.timeline_event:write",
        "public.timeline_source:read",
        "public.timeline_template:read",
        "public.unit:read",
        "public.unit:write",
        "public.unit_type:read",
        "public.unit_type:write",
        "public.webhook_endpoint:read",
        "public.webhook_endpoint:write",
    }
)

PKCE_METHODS: frozenset[str] = frozenset({"S256", "plain"})

# The webhook event types confirmed in the docs (shared/stora-api/event-types.json); the
# only values ``event_types`` of a webhook endpoint may hold.
EVENT_TYPES: tuple[str, ...] = (
    "contact.created",
    "contact.updated",
    "contact.churned",
    "coupon.created",
    "credit_note.created",
    "deal.updated",
    "identity_verification.processing",
    "identity_verification.succeeded",
    "invoice.created",
    "invoice.paid",
    "order.created",
    "protection_level.created",
    "unit.updated",
    "unit_type.updated",
)

# The only API version Stora accepts for webhook endpoints and event payloads.
API_VERSION = "2025-09"

# Allowed values for the string-valued switches; booleans and integers are checked by type.
_CHOICES: dict[str, frozenset[str]] = {
    "revocation_mode": frozenset({"on_use", "immediate"}),
    "token_info_expires_in": frozenset({"absolute", "remaining"}),
    "page_overflow": frozenset({"empty", "error"}),
    "rate_limit_key": frozenset({"token", "operator", "application"}),
    "rate_limit_window": frozenset({"fixed", "sliding"}),
    "idempotency_key_reuse": frozenset({"replay", "reject"}),
}

# Upper bounds for numeric switches (the lower bound is always 0).
_MAXIMUMS: dict[str, float] = {"webhook_duplicate_rate": 1.0, "webhook_max_retries": 20}


@dataclass(frozen=True)
class Switches:
    """Runtime behaviour switches, readable and patchable via ``/_sandbox/config``.

    Attributes:
        access_token_ttl: access-token lifetime in seconds (Stora documents 7200).
        code_ttl: authorization-code lifetime in seconds (Doorkeeper default 600).
        revocation_mode: ``"on_use"`` (Doorkeeper default: the old token row survives a
            refresh and is revoked when the new access token first authenticates a
            protected request) or ``"immediate"`` (the old row is revoked during refresh).
        force_pkce: reject authorize requests that carry no ``code_challenge``.
        pkce_methods: space-separated accepted challenge methods (Doorkeeper default
            ``"S256 plain"``).
        token_info_operator_id: add the sandbox operator id to ``operator`` in token info
            (Stora's example shows only ``name``).
        token_info_expires_in: ``"absolute"`` (created_at + ttl, as the docs example reads)
            or ``"remaining"`` (seconds left, as stock Doorkeeper does).
        omit_refresh_token_on_refresh: refresh responses carry no ``refresh_token``; the
            presented refresh token then stays valid and moves to the new row.
        omit_expires_in: token responses carry no ``expires_in``.
        latency_ms: delay added to every non-admin request.
        default_scopes: scopes granted when an authorize request names none; empty means
            such a request fails with ``invalid_scope`` (Doorkeeper without defaults).
        page_overflow: a ``page`` beyond the last page gives an empty page (``"empty"``)
            or 422 ``invalid_url_param`` (``"error"``).
        rate_limit_per_second: requests allowed per second and key on the limited
            endpoints (see :mod:`stora_sandbox.ratelimit`); 0 = no per-second limit.
            Stora documents 10, the default.
        rate_limit_per_minute: the same per minute; 0 = no per-minute limit. Stora
            documents 60, the default.
        rate_limit_key: what a limit counts per: ``"token"`` (each access token, the
            default), ``"operator"`` or ``"application"`` (undocumented at Stora).
        rate_limit_window: ``"fixed"`` (epoch-aligned windows, every request counts,
            as Rack::Attack does) or ``"sliding"`` (at most N admitted requests in any
            interval as long as the period; only admitted requests count).
        rate_limit_retry_after: add ``Retry-After`` (whole seconds) to 429s; Stora
            documents only ``RateLimit-Limit`` and ``RateLimit-Reset``.
        rate_limit_headers_on_success: also send ``RateLimit-Limit``/``RateLimit-Reset``
            on limited endpoints' responses that were not throttled (Stora's docs do not
            say which responses carry them).
        rate_limit_token_endpoint: also limit ``POST /oauth2/token`` (Stora does not
            say whether it is limited), counted per client id.
        idempotency_ttl: seconds a stored ``Idempotency-Key`` response is replayed
            (Stora documents 24 hours).
        idempotency_key_reuse: a key reused with a different method, path or body gets
            the stored response (``"replay"``, the documented reading) or 400
            ``invalid_request`` (``"reject"``).
        reject_unknown_fields: bodies of write endpoints may not carry fields the docs
            do not list (422 ``invalid_content``); false ignores such fields.
        allow_http_loopback_webhooks: webhook endpoint URLs may use ``http://`` when the
            host is a loopback address or ``localhost`` (Stora requires ``https://``).
        webhook_enable_endpoint: serve ``POST /webhook_endpoints/<id>/enable`` (not in
            Stora's docs; off by default, so the route answers 404 like Stora).
        webhook_time_factor: multiplies the retry delays (1 min, 5 min, 30 min, 2 h,
            5 h, 10 h); e.g. 0.001 turns one minute into 60 ms.
        webhook_timeout_s: per-attempt HTTP timeout in seconds (undocumented at Stora).
        webhook_max_retries: retries after a failed first attempt (Stora documents 6;
            retries beyond the sixth reuse the last delay).
        webhook_resign_retries: every attempt is signed with a fresh ``t``; false reuses
            the first attempt's ``t`` (and so its signature).
        webhook_duplicate_rate: probability (0 to 1) that a delivery is also sent a
            second time, as an independent duplicate with its own retries.
        webhook_shuffle: events emitted together are delivered in a different order
            than they happened (never the original order when there are two or more).
        webhook_auto_disable_after: disable an endpoint after this many consecutive
            failed delivery attempts; 0 = never (Stora does not document it).
    """

    access_token_ttl: int = 7200
    code_ttl: int = 600
    revocation_mode: str = "on_use"
    force_pkce: bool = False
    pkce_methods: str = "S256 plain"
    token_info_operator_id: bool = False
    token_info_expires_in: str = "absolute"  # noqa: S105 - a mode name, not a secret
    omit_refresh_token_on_refresh: bool = False
    omit_expires_in: bool = False
    latency_ms: int = 0
    default_scopes: str = ""
    page_overflow: str = "empty"
    rate_limit_per_second: int = 10
    rate_limit_per_minute: int = 60
    rate_limit_key: str = "token"
    rate_limit_window: str = "fixed"
    rate_limit_retry_after: bool = False
    rate_limit_headers_on_success: bool = False
    rate_limit_token_endpoint: bool = False
    idempotency_ttl: int = 86_400
    idempotency_key_reuse: str = "replay"
    reject_unknown_fields: bool = True
    allow_http_loopback_webhooks: bool = True
    webhook_enable_endpoint: bool = False
    webhook_time_factor: float = 1.0
    webhook_timeout_s: float = 10.0
    webhook_max_retries: int = 6
    webhook_resign_retries: bool = True
    webhook_duplicate_rate: float = 0.0
    webhook_shuffle: bool = False
    webhook_auto_disable_after: int = 0

    def __post_init__(self) -> None:
        # JSON and the CLI may give a whole number for a float switch; keep it as float.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, float) and type(value) is int:
                object.__setattr__(self, f.name, float(value))
        _validate(self)

    def as_dict(self) -> dict[str, Any]:
        """Return the switches as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> Switches:
        """Return a copy with ``changes`` applied.

        Raises:
            ValueError: a key is unknown or a value has the wrong type or is out of range.
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return dataclasses.replace(self, **dict(changes))

    @property
    def accepted_pkce_methods(self) -> frozenset[str]:
        """The challenge methods the authorize endpoint accepts."""
        return frozenset(self.pkce_methods.split())


def _validate(switches: Switches) -> None:
    """Check every field's type and range; raise ValueError naming the first bad one."""
    for f in dataclasses.fields(switches):
        value = getattr(switches, f.name)
        default = f.default
        # bool is a subclass of int, so compare exact types to keep 1 from passing as True.
        if type(value) is not type(default):
            raise ValueError(f"{f.name} must be of type {type(default).__name__}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{f.name} must be >= 0")
            if f.name in _MAXIMUMS and value > _MAXIMUMS[f.name]:
                raise ValueError(f"{f.name} must be <= {_MAXIMUMS[f.name]:g}")
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            allowed = ", ".join(sorted(_CHOICES[f.name]))
            raise ValueError(f"{f.name} must be one of: {allowed}")
    methods = switches.pkce_methods.split()
    if not methods or not set(methods) <= PKCE_METHODS:
        raise ValueError("pkce_methods must be a space-separated subset of 'S256 plain'")
    unknown_scopes = set(switches.default_scopes.split()) - STORA_SCOPES
    if unknown_scopes:
        raise ValueError(f"default_scopes has unknown scopes: {' '.join(sorted(unknown_scopes))}")
    if switches.access_token_ttl == 0 or switches.code_ttl == 0:
        raise ValueError("access_token_ttl and code_ttl must be > 0")
    if not 0 < switches.webhook_timeout_s < float("inf"):
        raise ValueError("webhook_timeout_s must be a positive number")
    if switches.webhook_time_factor == float("inf"):
        raise ValueError("webhook_time_factor must be finite")


@dataclass(frozen=True)
class ApplicationSpec:
    """An OAuth client application to register at start-up.

    ``scopes`` empty means "every Stora scope".
    """

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    name: str = "Partner application"
    scopes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SandboxConfig:
    """Everything :func:`stora_sandbox.create_app` needs.

    Attributes:
        applications: OAuth clients registered at start-up (more can be added through
            ``POST /_sandbox/applications``).
        seed: name of a seed data set (``"demo"``) or None for an empty sandbox.
        public_url: the sandbox's own base URL as clients reach it, used in
            ``GET /_sandbox/``; None means "derive from the request".
        switches: initial runtime switches; ``POST /_sandbox/reset`` restores them.
        clock: epoch-seconds clock. Tests inject a controllable one to move time forward
            (token and code expiry, request-log timestamps).
        canary: a marker every issued secret carries (codes ``code_<marker>_…``, tokens
            ``at_``/``rt_<marker>_…``, webhook secrets ``whsec_<marker>_…``), so a client's
            logs and storage can be searched for any of them at once; "" issues plain
            Doorkeeper-style values.
    """

    applications: tuple[ApplicationSpec, ...] = ()
    seed: str | None = None
    public_url: str | None = None
    switches: Switches = field(default_factory=Switches)
    clock: Callable[[], float] = time.time
    canary: str = ""
