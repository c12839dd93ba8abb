"""Per-request plumbing: request ids, global latency, faults, rate limits, request log.

Registered once by :func:`install`. Admin requests (``/_sandbox/...``) get a request id
but no latency, no faults and no log entry, so test bookkeeping never disturbs what is
being measured.

Log entries (``GET /_sandbox/requests`` and the ``stora_sandbox.requests`` logger) hold
method, path without query string, status, timings, client id, operator id and grant
type. Never a token, code or secret.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

from flask import Flask, Response, g, request

from stora_sandbox import faults
from stora_sandbox.models import Fault
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
        fault = store.take_fault(endpoint, g.grant_type)
        g.fault = fault
        if fault is not None:
            replacement = faults.response_before_view(fault, request.environ)
            g.fault_replaced_view = replacement is not None
            if replacement is not None:
                return replacement
        if endpoint == "api":
            return _throttle(store)
        return None

    @app.after_request
    def finish_request(response: Response) -> Response:
        fault = g.get("fault")
        if fault is not None and not g.get("fault_replaced_view"):
            response = faults.apply_after_view(fault, response, request.environ)
        response.headers["X-Request-Id"] = request_id()
        if not _is_admin():
            _record(store, response, fault)
        return response


def _throttle(store: Store) -> Response | None:
    """Answer 429 if the ``rate_limit_*`` switches say this API request is over budget."""
    switches = store.switches
    limits = [(switches.rate_limit_per_second, 1), (switches.rate_limit_per_minute, 60)]
    if not any(limit for limit, _period in limits):
        return None
    token = bearer_token() or ""
    # Looking the row up is not a Doorkeeper "use"; unknown tokens count per value.
    row = store.row_by_access_token(token)
    if row is None or switches.rate_limit_key == "token":
        key = f"token:{token}"
    elif switches.rate_limit_key == "operator":
        key = f"operator:{row.operator_id}"
    else:
        key = f"application:{row.client_id}"
    now = store.now()
    throttled = store.rate_limiter.hit(key, now, limits)
    if throttled is None:
        return None
    response = stora_error("too_many_requests", "Too many requests. Please retry later.")
    response.headers["RateLimit-Limit"] = str(throttled.limit)
    response.headers["RateLimit-Reset"] = str(throttled.reset_at)
    if switches.rate_limit_retry_after:
        response.headers["Retry-After"] = str(max(1, math.ceil(throttled.reset_at - now)))
    return response


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
