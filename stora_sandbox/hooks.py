"""Per-request plumbing: request ids, global latency, rate limits, faults, idempotency
keys and the request log.

Registered once by :func:`install`. Admin requests (``/_sandbox/...``) get a request id
but no latency, no limits, no faults and no log entry, so test bookkeeping never
disturbs what is being measured.

Order for a wire request: ``latency_ms`` → rate limit → queued fault → Idempotency-Key
(:mod:`stora_sandbox.idempotency`) → the view. A throttled request therefore consumes no
fault and stores nothing under its key.

Rate limits (:mod:`stora_sandbox.ratelimit`) apply to ``/2025-09/...`` and
``GET /oauth2/token/info`` (keyed per the ``rate_limit_key`` switch: the access token's
row, its operator or its application; a request whose token is unknown is counted per
token value), and to ``POST /oauth2/token`` only when ``rate_limit_token_endpoint`` is
on (counted per client id, in the application's bucket when ``rate_limit_key`` is
``"application"``). Authorize, introspect and revoke are never limited. A throttled
request (OAuth ones included) gets 429 ``too_many_requests`` in Stora's API error
envelope with ``RateLimit-Limit``, ``RateLimit-Reset`` (epoch seconds) and, under
``rate_limit_retry_after``, ``Retry-After`` (whole seconds, at least 1).

Log entries (``GET /_sandbox/requests`` and the ``stora_sandbox.requests`` logger) hold
method, path without query string, status, timings, client id, operator id and grant
type; the admin log also holds ``throttled`` (429 from the limiter, as opposed to an
injected 429), ``rate_limit_key`` (a label such as ``token:<row id>``,
``operator:<id>``, ``application:<client id>`` or ``client:<client id>``),
``idempotency_key`` and ``idempotent_replay``. ``at`` of a limited request is the clock
reading the limiter decided on. Never a token, code or secret.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid

from flask import Flask, Response, g, request

from stora_sandbox import faults, idempotency
from stora_sandbox.models import Fault
from stora_sandbox.ratelimit import Decision
from stora_sandbox.store import Store
from stora_sandbox.tokens import OAuthError
from stora_sandbox.wire import (
    basic_credentials,
    bearer_token,
    request_id,
    request_params,
    stora_error,
)

log = logging.getLogger("stora_sandbox.requests")

ADMIN_PREFIX = "/_sandbox"


def _is_admin() -> bool:
    return request.path == ADMIN_PREFIX or request.path.startswith(ADMIN_PREFIX + "/")


def _note_client_and_grant(endpoint: str) -> None:
    """Record client id and grant type for the log and for fault matching."""
    g.client_id = None
    g.grant_type = None
    if endpoint not in {"authorize", "token", "introspect", "revoke"}:
        return
    try:
        params = request_params()
    except OAuthError:
        # The view reports the malformed body; the log just lacks these fields.
        return
    basic = basic_credentials()
    g.client_id = basic[0] if basic else params.get("client_id")
    if endpoint == "token":
        g.grant_type = params.get("grant_type")


def install(app: Flask, store: Store) -> None:
    """Register the before/after request hooks on ``app``."""

    @app.before_request
    def start_request() -> Response | None:
        g.request_id = str(uuid.uuid4())
        g.started = time.perf_counter()
        g.at = store.now()
        g.operator_id = None
        g.fault = None
        if _is_admin():
            return None
        endpoint = faults.endpoint_for(request.path)
        g.endpoint = endpoint
        latency_ms = store.switches.latency_ms
        if latency_ms:
            time.sleep(latency_ms / 1000)
        if endpoint is None:
            return None
        _note_client_and_grant(endpoint)
        throttled = _throttle(store, endpoint)
        if throttled is not None:
            return throttled
        fault = store.take_fault(endpoint, g.grant_type)
        g.fault = fault
        if fault is not None:
            replacement = faults.response_before_view(fault, request.environ)
            g.fault_replaced_view = replacement is not None
            if replacement is not None:
                if fault.stored and not faults.is_dropped(request.environ):
                    early = idempotency.before(store)
                    if early is not None:
                        return early
                return replacement
        return idempotency.before(store)

    @app.after_request
    def finish_request(response: Response) -> Response:
        if _is_admin():
            response.headers["X-Request-Id"] = request_id()
            return response
        # Store what the application answered, before an after-view fault alters it.
        idempotency.after(store, response)
        fault = g.get("fault")
        if fault is not None and not g.get("fault_replaced_view"):
            response = faults.apply_after_view(fault, response, request.environ)
        decision: Decision | None = g.get("rate_decision")
        if decision and decision.allowed and store.switches.rate_limit_headers_on_success:
            _rate_headers(response, decision, retry_after=False)
        response.headers["X-Request-Id"] = request_id()
        _record(store, response, fault)
        return response

    @app.teardown_request
    def release_claims(_error: BaseException | None) -> None:
        idempotency.teardown(store)


def _rate_limit_key(store: Store, endpoint: str) -> tuple[str, str]:
    """The limiter key and its log label for this request (neither holds a token)."""
    mode = store.switches.rate_limit_key
    if endpoint == "token":
        client = g.get("client_id") or "unknown"
        label = f"application:{client}" if mode == "application" else f"client:{client}"
        return label, label
    token = bearer_token()
    # Looking the row up is not a Doorkeeper "use".
    row = store.row_by_access_token(token)
    if row is None:
        digest = hashlib.sha256((token or "").encode()).hexdigest()
        return f"token-value:{digest}", "token:unknown" if token else "token:none"
    g.client_id = row.client_id
    g.operator_id = row.operator_id
    if mode == "operator":
        label = f"operator:{row.operator_id}"
    elif mode == "application":
        label = f"application:{row.client_id}"
    else:
        label = f"token:{row.id}"
    return label, label


def _throttle(store: Store, endpoint: str) -> Response | None:
    """Count the request against its limits; answer 429 when it is over budget."""
    switches = store.switches
    limited = endpoint in {"api", "token_info"} or (
        endpoint == "token" and switches.rate_limit_token_endpoint
    )
    limits = [(switches.rate_limit_per_second, 1), (switches.rate_limit_per_minute, 60)]
    if not limited or not any(limit for limit, _period in limits):
        return None
    key, label = _rate_limit_key(store, endpoint)
    decision = store.rate_limiter.hit(key, store.now, limits, switches.rate_limit_window)
    g.at = decision.at
    g.rate_limit_key = label
    g.rate_decision = decision
    if decision.allowed:
        return None
    g.throttled = True
    # One responder for every limited path, as a Rack::Attack throttle has (inferred).
    response = stora_error(
        "too_many_requests",
        "Rate Limit Exceeded. You have reached the maximum number of requests. "
        "Please try again later.",
    )
    _rate_headers(response, decision, retry_after=switches.rate_limit_retry_after)
    return response


def _rate_headers(response: Response, decision: Decision, *, retry_after: bool) -> None:
    if decision.limit is None or decision.reset_at is None:
        return
    response.headers["RateLimit-Limit"] = str(decision.limit)
    response.headers["RateLimit-Reset"] = str(decision.reset_at)
    if retry_after:
        response.headers["Retry-After"] = str(max(1, math.ceil(decision.reset_at - decision.at)))


def _record(store: Store, response: Response, fault: Fault | None) -> None:
    dropped = faults.is_dropped(request.environ)
    started = g.get("started", time.perf_counter())
    entry = {
        "at": g.get("at", store.now()),
        "method": request.method,
        "path": request.path,
        "status": None if dropped else response.status_code,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        "endpoint": g.get("endpoint"),
        "client_id": g.get("client_id"),
        "operator_id": g.get("operator_id"),
        "grant_type": g.get("grant_type"),
        "request_id": request_id(),
        "fault_id": fault.id if fault is not None else None,
        "dropped": dropped,
        "throttled": bool(g.get("throttled")),
        "rate_limit_key": g.get("rate_limit_key"),
        "idempotency_key": g.get("idempotency_key"),
        "idempotent_replay": bool(g.get("idempotent_replay")),
    }
    store.record_request(entry)
    log.info(
        "%s %s %s %.1fms client=%s operator=%s grant=%s%s",
        entry["method"],
        entry["path"],
        "dropped" if dropped else entry["status"],
        entry["duration_ms"],
        entry["client_id"] or "-",
        entry["operator_id"] or "-",
        entry["grant_type"] or "-",
        f" fault={fault.id}" if fault is not None else "",
    )
