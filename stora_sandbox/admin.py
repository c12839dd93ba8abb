"""Blueprint for the sandbox's admin/test API under ``/_sandbox`` (JSON, no auth).

Local use only: it exposes every token and webhook secret the sandbox ever issued.
Admin requests are not delayed, not rate limited, not subject to faults and not written
to the request log. Errors are ``{"error": "<message>"}`` with 400 (bad input), 404
(unknown id) or 409 (conflict).

What the wire side plays (details in each module's docstring):

* OAuth with Doorkeeper semantics (:mod:`stora_sandbox.oauth`, :mod:`stora_sandbox.tokens`).
* ``/2025-09`` API (:mod:`stora_sandbox.api`): sites, contacts, orders (read); timeline
  sources, templates and events (:mod:`stora_sandbox.timeline`); webhook endpoints
  (:mod:`stora_sandbox.endpoints`). Every ``POST`` honours ``Idempotency-Key``
  (:mod:`stora_sandbox.idempotency`): the first response, success or error, is replayed
  for 24 h per application, operator and key.
* Rate limits, **on by default**: 10 requests per second and 60 per minute per access
  token on ``/2025-09/...`` and ``GET /oauth2/token/info`` (:mod:`stora_sandbox.hooks`,
  :mod:`stora_sandbox.ratelimit`). Fixed windows aligned to the clock: seconds
  ``[n, n+1)``, minutes ``[60n, 60n+60)``; every request counts, throttled ones too.
  429 ``too_many_requests`` in Stora's error envelope with ``RateLimit-Limit`` and
  ``RateLimit-Reset`` (epoch seconds; the end of the exceeded window that ends last).
  Turn off with ``rate_limit_per_second=0`` and ``rate_limit_per_minute=0``.
* Webhooks (:mod:`stora_sandbox.webhooks`): creating an order through this admin API
  emits ``order.created`` to every enabled endpoint of the operator subscribed to it,
  from a background thread, signed ``X-Stora-Signature: t=…,v1=…``, retried after 1 min,
  5 min, 30 min, 2 h, 5 h, 10 h (times ``webhook_time_factor``) until a 2xx.

Endpoints
---------

``GET /_sandbox/``
    Index: the sandbox's public URL and the absolute URLs of the OAuth endpoints and the
    API base, for configuring a client.

``GET /_sandbox/health``
    ``{"ok": true}``; for readiness polling.

``GET /_sandbox/applications`` / ``POST /_sandbox/applications``
    List, or register/replace (upsert by ``client_id``) an OAuth client:
    ``{"client_id", "client_secret", "redirect_uris": [...], "name"?, "scopes"?: [...]}``
    (``scopes`` defaults to every Stora scope). Answers 201 (created) or 200 (replaced)
    with the application, never its secret.

``GET /_sandbox/operators`` / ``POST /_sandbox/operators``
    List operators, or create one: ``{"name", "subdomain"?, "sites"?, "contacts"?,
    "orders"?}`` (counts default to 0; orders get a site if there is none). 201 with
    ``{"id", "name", "subdomain", "sites", "contacts", "orders"}`` (counts). Every
    operator also gets its own timeline source ("<name> CRM").

``GET /_sandbox/operators/<id>``
    One operator with its counts.

``POST /_sandbox/operators/<id>/orders``
    Create orders now: ``{"count"?: int (default 1), "fields"?: {...}}``; ``fields``
    override generated order fields in wire shape (e.g. ``"status"``, ``"metadata"``,
    ``"created_at"``, ``"site": {"id": ...}``). 201 with ``{"orders": [...]}``. Emits one
    ``order.created`` per order, as one batch (see ``webhook_shuffle``), with the order's
    contact and site embedded in full.

``PATCH /_sandbox/orders/<order_id>``
    Change an order: the body's fields are merged in and ``updated_at`` becomes now
    unless given. 200 with ``{"order": {...}}``. Drives ``updated_after`` sync tests.

``POST /_sandbox/operators/<id>/events``
    Emit any documented event type: ``{"type": "contact.updated", "data"?: {...}}``.
    ``data`` is the envelope's ``event.data`` verbatim (e.g. ``{"contact": {...}}``);
    without it the operator's latest order (expanded) or contact is used for ``order.*``
    and ``contact.*``, else a stub ``{id, created_at, updated_at}``. 201 with
    ``{"event": {...}, "deliveries": [delivery ids queued]}``.

``GET /_sandbox/operators/<id>/timeline_events``
    Every timeline event recorded for the operator, oldest first, in wire shape plus
    ``"sandbox": {"client_id", "message"}`` (the template message with variables
    filled in, as the account-wide timeline would read). ``{"timeline_events": [...]}``.

``POST /_sandbox/operators/<id>/expire_access_tokens``
    Expire the operator's live access tokens now (refresh tokens stay valid), so the next
    API call gets 401 and the client must refresh. ``{"expired": n}``.

``POST /_sandbox/operators/<id>/revoke_tokens``
    Revoke all of the operator's tokens and unused codes, as when the operator
    disconnects the app in BackOffice. ``{"revoked": n}``.

``GET /_sandbox/webhook_endpoints[?operator_id=<id>]``
    Every webhook endpoint in creation order, wire shape **with** its ``secret`` (for
    secret-canary tests) plus ``"sandbox": {"operator_id", "client_id",
    "consecutive_failures"}``. ``{"webhook_endpoints": [...]}``.

``GET /_sandbox/webhook_deliveries[?endpoint_id=<id>][&event_id=<id>]``
    ``{"deliveries": [...], "pending": [...]}``. ``deliveries`` is the attempt log,
    oldest first: ``{"seq", "delivery_id", "event_id", "event_type", "endpoint_id",
    "operator_id", "attempt" (1 = first delivery), "duplicate", "at" (sandbox clock),
    "url", "request_id" (the ``X-Stora-Request-Id`` sent), "signature_t", "status_code"
    (null without an HTTP answer), "error" (timeout/connection error, or
    ``endpoint_disabled``/``endpoint_missing`` when ``skipped``), "ok", "skipped",
    "duration_ms", "next_attempt_in_s" (null when no retry follows), "gave_up",
    "endpoint_disabled" (this failure auto-disabled it)}``. ``pending`` lists queued
    attempts with ``due_in_s``. Never a secret or signature.

``POST /_sandbox/webhook_deliveries/flush``
    Make every queued attempt due now, ignoring backoff, and wait until each has been
    made once (retries they schedule stay queued; call again to push those through).
    Body ``{"timeout_s"?: number (default 30)}``. ``{"flushed": n, "pending": m}``.

``GET /_sandbox/requests?since=<seq>`` / ``DELETE /_sandbox/requests``
    The request log after sequence number ``since`` (default 0): ``{"requests": [{"seq",
    "at" (epoch float, sandbox clock; for limited endpoints the instant the limiter
    decided on), "method", "path" (no query string), "status" (null when the connection
    was dropped), "duration_ms", "endpoint", "client_id", "operator_id", "grant_type",
    "request_id", "fault_id", "dropped", "throttled" (429 from the limiter, not a fault),
    "rate_limit_key" (``token:<row id>``, ``operator:<id>``, ``application:<client id>``,
    ``client:<client id>``, ``token:unknown`` or ``token:none``; null when not limited),
    "idempotency_key", "idempotent_replay"}]}``. Throttled requests are logged like any
    other, so a test can count 429s and re-check every window from ``at`` and
    ``rate_limit_key`` alone. DELETE empties it; sequence numbers keep increasing.

``GET /_sandbox/tokens[?operator_id=<id>]``
    Every authorization code, access token and refresh token issued, for secret-canary
    tests: ``{"tokens": [{"kind": "authorization_code"|"access_token"|"refresh_token",
    "value", "client_id", "operator_id", "state": "active"|"revoked"|"expired",
    "created_at", "expires_at", "row_id"?}]}``.

``GET /_sandbox/config`` / ``PATCH /_sandbox/config``
    Read or change the runtime switches (documented one by one on
    :class:`stora_sandbox.config.Switches`). PATCH answers the full new config; unknown
    keys or bad values give 400 and change nothing. OAuth: ``access_token_ttl``,
    ``code_ttl``, ``revocation_mode`` (``on_use``|``immediate``), ``force_pkce``,
    ``pkce_methods``, ``token_info_operator_id``, ``token_info_expires_in``
    (``absolute``|``remaining``), ``omit_refresh_token_on_refresh``,
    ``omit_expires_in``, ``default_scopes``. API: ``latency_ms``, ``page_overflow``
    (``empty``|``error``), ``reject_unknown_fields`` (true). Rate limits:
    ``rate_limit_per_second`` (10), ``rate_limit_per_minute`` (60), ``rate_limit_key``
    (``token``|``operator``|``application``), ``rate_limit_window``
    (``fixed``|``sliding``), ``rate_limit_retry_after`` (false),
    ``rate_limit_headers_on_success`` (false), ``rate_limit_token_endpoint`` (false).
    Idempotency: ``idempotency_ttl`` (86400), ``idempotency_key_reuse``
    (``replay``|``reject``). Webhooks: ``allow_http_loopback_webhooks`` (true),
    ``webhook_enable_endpoint`` (false), ``webhook_time_factor`` (1.0),
    ``webhook_timeout_s`` (10.0), ``webhook_max_retries`` (6),
    ``webhook_resign_retries`` (true), ``webhook_duplicate_rate`` (0.0),
    ``webhook_shuffle`` (false), ``webhook_auto_disable_after`` (0 = never).

``GET /_sandbox/faults`` / ``POST /_sandbox/faults`` / ``DELETE /_sandbox/faults``
    List, queue or clear faults. POST body: ``{"endpoint": "authorize"|"token"|
    "token_info"|"introspect"|"revoke"|"api", "status"?, "body"?, "headers"?,
    "latency_ms"?, "latency_after_commit_ms"?, "mode"?: "drop_after_commit"|
    "drop_before_commit"|"malformed_json", "count"?: int (default 1, -1 = forever),
    "grant_type"?, "stored"?: bool}``. Semantics in :mod:`stora_sandbox.faults`
    (``stored`` keeps an injected error under the request's ``Idempotency-Key``). A
    throttled request consumes no fault. 201 with the fault.

``POST /_sandbox/reset``
    Wipe operators, records, timeline events, webhook endpoints, stored idempotent
    responses, codes, tokens, rate counters, the request log and faults; drop queued
    webhook attempts and the attempt log; restore the start-up switches; applications
    stay. Body ``{"seed"?: "demo"|null}`` chooses what to load afterwards (default: the
    start-up seed); the global timeline source and templates are always loaded.
    ``{"operators": [...]}``.
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from stora_sandbox import faults, seed, timeline, webhooks
from stora_sandbox.config import EVENT_TYPES, STORA_SCOPES, ApplicationSpec, SandboxConfig
from stora_sandbox.endpoints import public_view
from stora_sandbox.models import Operator
from stora_sandbox.store import Store

bp = Blueprint("admin", __name__, url_prefix="/_sandbox")

MAX_GENERATED = 100_000
SUBDOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


class AdminError(Exception):
    """Abort an admin request with ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@bp.errorhandler(AdminError)
def _admin_error(exc: AdminError) -> tuple[Response, int]:
    return jsonify({"error": exc.message}), exc.status


def _store() -> Store:
    store: Store = current_app.extensions["stora_sandbox"]
    return store


def _config() -> SandboxConfig:
    config: SandboxConfig = current_app.extensions["stora_sandbox.config"]
    return config


def _body() -> dict[str, Any]:
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise AdminError("body must be a JSON object")
    return body


def _count(body: dict[str, Any], key: str, default: int = 0) -> int:
    value = body.get(key, default)
    if type(value) is not int or not 0 <= value <= MAX_GENERATED:
        raise AdminError(f"{key} must be an integer between 0 and {MAX_GENERATED}")
    return value


def _operator(operator_id: str) -> Operator:
    operator = _store().get_operator(operator_id)
    if operator is None:
        raise AdminError(f"unknown operator {operator_id}", 404)
    return operator


# -- index ----------------------------------------------------------------------------


@bp.get("/")
def index() -> Response:
    base = (_config().public_url or request.host_url).rstrip("/")
    return jsonify(
        {
            "name": "stora_sandbox",
            "public_url": base,
            "authorize_url": f"{base}/oauth2/authorize",
            "token_url": f"{base}/oauth2/token",
            "token_info_url": f"{base}/oauth2/token/info",
            "introspect_url": f"{base}/oauth2/introspect",
            "revoke_url": f"{base}/oauth2/revoke",
            "api_base_url": f"{base}/2025-09",
        }
    )


@bp.get("/health")
def health() -> Response:
    return jsonify({"ok": True})


# -- applications ---------------------------------------------------------------------


@bp.get("/applications")
def list_applications() -> Response:
    store = _store()
    with store.lock:
        apps = [a.summary() for a in store.applications.values()]
    return jsonify({"applications": apps})


@bp.post("/applications")
def upsert_application() -> tuple[Response, int]:
    body = _body()
    client_id, secret = body.get("client_id"), body.get("client_secret")
    uris = body.get("redirect_uris")
    if not isinstance(client_id, str) or not client_id:
        raise AdminError("client_id must be a non-empty string")
    if not isinstance(secret, str) or not secret:
        raise AdminError("client_secret must be a non-empty string")
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) and u for u in uris):
        raise AdminError("redirect_uris must be a non-empty list of strings")
    scopes = body.get("scopes", [])
    if not isinstance(scopes, list) or not set(scopes) <= STORA_SCOPES:
        raise AdminError("scopes must be a list of Stora scopes")
    name = body.get("name", "Partner application")
    if not isinstance(name, str) or not name:
        raise AdminError("name must be a non-empty string")
    store = _store()
    existed = store.get_application(client_id) is not None
    app = store.upsert_application(
        ApplicationSpec(
            client_id=client_id,
            client_secret=secret,
            redirect_uris=tuple(uris),
            name=name,
            scopes=frozenset(scopes),
        )
    )
    return jsonify(app.summary()), 200 if existed else 201


# -- operators and records ------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "operator"


@bp.get("/operators")
def list_operators() -> Response:
    store = _store()
    return jsonify({"operators": [store.operator_summary(o) for o in store.list_operators()]})


@bp.post("/operators")
def create_operator() -> tuple[Response, int]:
    body = _body()
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AdminError("name must be a non-empty string")
    subdomain = body.get("subdomain") or _slug(name)
    if not isinstance(subdomain, str) or not SUBDOMAIN.fullmatch(subdomain):
        raise AdminError("subdomain must be lowercase letters, digits and hyphens")
    counts = {key: _count(body, key) for key in ("sites", "contacts", "orders")}
    store = _store()
    with store.lock:
        if any(o.subdomain == subdomain for o in store.operators.values()):
            raise AdminError(f"subdomain {subdomain} is taken", 409)
        operator, factory = seed.create_operator(
            store, name=name.strip(), subdomain=subdomain, rng=random.Random()
        )
    now = datetime.fromtimestamp(store.now(), UTC)
    start = now - timedelta(days=365)
    factory.populate(**counts, start=start, end=now)
    # A brand-new operator has no webhook endpoints, so these orders emit no events.
    return jsonify(store.operator_summary(operator)), 201


@bp.get("/operators/<operator_id>")
def show_operator(operator_id: str) -> Response:
    return jsonify(_store().operator_summary(_operator(operator_id)))


def _factory_for(store: Store, operator: Operator) -> seed.RecordFactory:
    sites = store.list_resources("site", operator.id)
    city = sites[0].data["address"]["city"] if sites else "London"
    return seed.RecordFactory(store, operator, city, random.Random())


@bp.post("/operators/<operator_id>/orders")
def create_orders(operator_id: str) -> tuple[Response, int]:
    operator = _operator(operator_id)
    body = _body()
    count = _count(body, "count", 1)
    fields = body.get("fields", {})
    if not isinstance(fields, dict):
        raise AdminError("fields must be an object")
    store = _store()
    factory = _factory_for(store, operator)
    now = datetime.fromtimestamp(int(store.now()), UTC)
    site_ids = [s.id for s in store.list_resources("site", operator.id)]
    contact_ids = [c.id for c in store.list_resources("contact", operator.id)]
    if not site_ids and "site" not in fields:
        site_ids.append(factory.site(now, 0).id)
    created = []
    for _ in range(count):
        try:
            order = factory.order(
                now,
                site_id=factory.rng.choice(site_ids) if site_ids else "",
                contact_id=factory.rng.choice(contact_ids) if contact_ids else None,
                overrides=fields,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise AdminError(f"bad order fields: {exc}") from None
        created.append(order.data)
    _emit(
        store,
        operator,
        [
            ("order.created", {"order": webhooks.expanded_order(store, data, operator.id)})
            for data in created
        ],
    )
    return jsonify({"orders": created}), 201


def _emit(
    store: Store, operator: Operator, events: list[tuple[str, dict[str, Any]]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Emit events to the operator's subscribed endpoints (never under the store lock)."""
    dispatcher: webhooks.Dispatcher = store.dispatcher
    return dispatcher.emit(operator, events)


@bp.patch("/orders/<order_id>")
def update_order(order_id: str) -> Response:
    body = _body()
    store = _store()
    with store.lock:
        order = store.resources["order"].get(order_id)
        if order is None:
            raise AdminError(f"unknown order {order_id}", 404)
        changes = {k: v for k, v in body.items() if k != "id"}
        changes.setdefault("updated_at", seed.iso(datetime.fromtimestamp(store.now(), UTC)))
        data = {**order.data, **changes}
        try:
            created_at = seed.parse_time(data["created_at"])
            updated_at = seed.parse_time(data["updated_at"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise AdminError(f"bad timestamp: {exc}") from None
        # Replace rather than mutate: a concurrent API response may be serialising it.
        order.data, order.created_at, order.updated_at = data, created_at, updated_at
    return jsonify({"order": data})


@bp.get("/operators/<operator_id>/timeline_events")
def list_timeline_events(operator_id: str) -> Response:
    operator = _operator(operator_id)
    store = _store()
    events = sorted(store.list_resources("timeline_event", operator.id), key=lambda r: r.seq)
    items = [
        {
            **event.data,
            "sandbox": {
                "client_id": event.client_id,
                "message": timeline.render_message(store, event),
            },
        }
        for event in events
    ]
    return jsonify({"timeline_events": items})


@bp.post("/operators/<operator_id>/events")
def emit_event(operator_id: str) -> tuple[Response, int]:
    operator = _operator(operator_id)
    body = _body()
    event_type = body.get("type")
    if event_type not in EVENT_TYPES:
        raise AdminError(f"type must be one of: {', '.join(EVENT_TYPES)}")
    store = _store()
    if "data" in body:
        data = body["data"]
        if not isinstance(data, dict):
            raise AdminError("data must be an object")
    else:
        try:
            data = webhooks.default_data(store, operator, event_type)
        except ValueError as exc:
            raise AdminError(str(exc)) from None
    (event,), queued = _emit(store, operator, [(event_type, data)])
    return jsonify({"event": event, "deliveries": queued}), 201


@bp.post("/operators/<operator_id>/expire_access_tokens")
def expire_access_tokens(operator_id: str) -> Response:
    operator = _operator(operator_id)
    return jsonify({"expired": _store().expire_operator_access_tokens(operator.id)})


@bp.post("/operators/<operator_id>/revoke_tokens")
def revoke_tokens(operator_id: str) -> Response:
    operator = _operator(operator_id)
    return jsonify({"revoked": _store().revoke_operator_tokens(operator.id)})


# -- observation ----------------------------------------------------------------------


@bp.get("/requests")
def list_requests() -> Response:
    try:
        since = int(request.args.get("since", "0"))
    except ValueError:
        raise AdminError("since must be an integer") from None
    return jsonify({"requests": _store().requests_since(since)})


@bp.delete("/requests")
def clear_requests() -> Response:
    _store().clear_requests()
    return jsonify({})


@bp.get("/webhook_endpoints")
def list_webhook_endpoints() -> Response:
    store = _store()
    operator_id = request.args.get("operator_id") or None
    items = [
        {
            **public_view(endpoint, with_secret=True),
            "sandbox": {
                "operator_id": endpoint.operator_id,
                "client_id": endpoint.client_id,
                "consecutive_failures": endpoint.consecutive_failures,
            },
        }
        for endpoint in store.list_webhook_endpoints(operator_id)
    ]
    return jsonify({"webhook_endpoints": items})


@bp.get("/webhook_deliveries")
def list_webhook_deliveries() -> Response:
    dispatcher: webhooks.Dispatcher = _store().dispatcher
    endpoint_id = request.args.get("endpoint_id") or None
    event_id = request.args.get("event_id") or None
    pending = [
        d
        for d in dispatcher.pending()
        if (endpoint_id is None or d["endpoint_id"] == endpoint_id)
        and (event_id is None or d["event_id"] == event_id)
    ]
    return jsonify({"deliveries": dispatcher.attempts(endpoint_id, event_id), "pending": pending})


@bp.post("/webhook_deliveries/flush")
def flush_webhook_deliveries() -> Response:
    body = _body()
    timeout = body.get("timeout_s", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        raise AdminError("timeout_s must be a number between 0 and 600")
    dispatcher: webhooks.Dispatcher = _store().dispatcher
    return jsonify(dispatcher.flush(float(timeout)))


@bp.get("/tokens")
def list_tokens() -> Response:
    items = _store().token_inventory()
    operator_id = request.args.get("operator_id")
    if operator_id:
        items = [t for t in items if t["operator_id"] == operator_id]
    return jsonify({"tokens": items})


# -- behaviour ------------------------------------------------------------------------


@bp.get("/config")
def show_config() -> Response:
    return jsonify(_store().switches.as_dict())


@bp.patch("/config")
def update_config() -> Response:
    try:
        switches = _store().update_switches(_body())
    except (ValueError, TypeError) as exc:
        raise AdminError(str(exc)) from None
    return jsonify(switches.as_dict())


@bp.get("/faults")
def list_faults() -> Response:
    return jsonify({"faults": _store().list_faults()})


@bp.post("/faults")
def add_fault() -> tuple[Response, int]:
    try:
        fields = faults.parse_fault(_body())
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    return jsonify(_store().add_fault(**fields).as_dict()), 201


@bp.delete("/faults")
def clear_faults() -> Response:
    _store().clear_faults()
    return jsonify({})


@bp.post("/reset")
def reset() -> Response:
    body = _body()
    seed_name = body["seed"] if "seed" in body else _config().seed
    if seed_name is not None and seed_name not in seed.SEEDS:
        raise AdminError(f"unknown seed {seed_name!r}")
    store = _store()
    store.dispatcher.clear()
    with store.lock:
        store.reset()
        seed.apply_seed(store, seed_name)
    return jsonify({"operators": [store.operator_summary(o) for o in store.list_operators()]})
