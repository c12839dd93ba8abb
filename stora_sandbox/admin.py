"""Blueprint for the sandbox's admin/test API under ``/_sandbox`` (JSON, no auth).

Local use only: it exposes every token the sandbox ever issued. Admin requests are not
delayed, not subject to faults and not written to the request log. Errors are
``{"error": "<message>"}`` with 400 (bad input), 404 (unknown id) or 409 (conflict).

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
    ``{"id", "name", "subdomain", "sites", "contacts", "orders"}`` (counts).

``GET /_sandbox/operators/<id>``
    One operator with its counts.

``POST /_sandbox/operators/<id>/orders``
    Create orders now: ``{"count"?: int (default 1), "fields"?: {...}}``; ``fields``
    override generated order fields in wire shape (e.g. ``"status"``, ``"metadata"``,
    ``"created_at"``, ``"site": {"id": ...}``). 201 with ``{"orders": [...]}``.

``PATCH /_sandbox/orders/<order_id>``
    Change an order: the body's fields are merged in and ``updated_at`` becomes now
    unless given. 200 with ``{"order": {...}}``. Drives ``updated_after`` sync tests.

``POST /_sandbox/operators/<id>/expire_access_tokens``
    Expire the operator's live access tokens now (refresh tokens stay valid), so the next
    API call gets 401 and the client must refresh. ``{"expired": n}``.

``POST /_sandbox/operators/<id>/revoke_tokens``
    Revoke all of the operator's tokens and unused codes, as when the operator
    disconnects the app in BackOffice. ``{"revoked": n}``.

``GET /_sandbox/requests?since=<seq>`` / ``DELETE /_sandbox/requests``
    The request log after sequence number ``since`` (default 0): ``{"requests": [{"seq",
    "at" (epoch float, sandbox clock), "method", "path" (no query string), "status" (null
    when the connection was dropped), "duration_ms", "endpoint", "client_id",
    "operator_id", "grant_type", "request_id", "fault_id", "dropped"}]}``. DELETE empties
    it; sequence numbers keep increasing.

``GET /_sandbox/tokens[?operator_id=<id>]``
    Every authorization code, access token and refresh token issued, for secret-canary
    tests: ``{"tokens": [{"kind": "authorization_code"|"access_token"|"refresh_token",
    "value", "client_id", "operator_id", "state": "active"|"revoked"|"expired",
    "created_at", "expires_at", "row_id"?}]}``.

``GET /_sandbox/config`` / ``PATCH /_sandbox/config``
    Read or change the runtime switches (see :class:`stora_sandbox.config.Switches`):
    ``access_token_ttl``, ``code_ttl``, ``revocation_mode`` (``on_use``|``immediate``),
    ``force_pkce``, ``pkce_methods``, ``token_info_operator_id``,
    ``token_info_expires_in`` (``absolute``|``remaining``),
    ``omit_refresh_token_on_refresh``, ``omit_expires_in``, ``latency_ms``,
    ``default_scopes``, ``page_overflow`` (``empty``|``error``), ``rate_limit_per_second``,
    ``rate_limit_per_minute`` (0 = off, the default; Stora documents 10 and 60),
    ``rate_limit_key`` (``token``|``operator``|``application``), ``rate_limit_retry_after``.
    PATCH answers the full new config; unknown keys or bad values give 400 and change
    nothing.

``GET /_sandbox/faults`` / ``POST /_sandbox/faults`` / ``DELETE /_sandbox/faults``
    List, queue or clear faults. POST body: ``{"endpoint": "authorize"|"token"|
    "token_info"|"introspect"|"revoke"|"api", "status"?, "body"?, "headers"?,
    "latency_ms"?, "latency_after_commit_ms"?, "mode"?: "drop_after_commit"|
    "drop_before_commit"|"malformed_json", "count"?: int (default 1, -1 = forever),
    "grant_type"?}``. Semantics in :mod:`stora_sandbox.faults`. 201 with the fault.

``POST /_sandbox/reset``
    Wipe operators, records, codes, tokens, the request log and faults, and restore the
    start-up switches; applications stay. Body ``{"seed"?: "demo"|null}`` chooses what
    to load afterwards (default: the start-up seed). ``{"operators": [...]}``.
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from stora_sandbox import faults, seed
from stora_sandbox.config import STORA_SCOPES, ApplicationSpec, SandboxConfig
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
    return jsonify({"orders": created}), 201


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
    with store.lock:
        store.reset()
        seed.apply_seed(store, seed_name)
    return jsonify({"operators": [store.operator_summary(o) for o in store.list_operators()]})
