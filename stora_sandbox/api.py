"""Blueprint for the versioned REST API under ``/2025-09``, and the helpers its routes share.

Routes here: ``GET /sites``, ``/sites/<id>``, ``/contacts``, ``/contacts/<id>``,
``/orders``, ``/orders/<id>``, scoped to the operator of the bearer token. The timeline
routes (:mod:`stora_sandbox.timeline`) and the webhook endpoint routes
(:mod:`stora_sandbox.endpoints`) are added to the same blueprint.

Contract (shared/stora-api/api-conventions.md):

* Bearer auth on every route; a missing, unknown, expired or revoked token gives 401
  ``invalid_token`` with ``WWW-Authenticate: Bearer error="invalid_token"``. Every
  successful authentication counts as a Doorkeeper "use" (see :mod:`stora_sandbox.tokens`),
  also when the scope check then fails.
* Missing scope gives 403 ``forbidden``; an unknown id (or another operator's) gives 404
  ``resource_not_found``; an unknown route gives 404 ``invalid_endpoint``.
* Write bodies must be JSON objects (``Content-Type: application/json``); anything else
  is 400 ``invalid_request``. Field problems are 422 ``invalid_content`` with one
  ``details`` item ``{"message", "pointer"}`` per problem (JSON pointer into the body).
* Every ``POST`` honours ``Idempotency-Key`` (see :mod:`stora_sandbox.idempotency`).
* Lists: ``page`` ≥ 1, ``limit`` 1 to 100 (default 50), ``sort_by`` ``created_at`` |
  ``updated_at``, ``sort_direction`` ``ASC`` | ``DESC`` (default ``created_at DESC``),
  ``created_after`` / ``updated_after`` (inclusive) and ``created_before`` /
  ``updated_before`` (exclusive), ISO 8601. Contacts also filter by ``email`` and
  ``status`` (comma-separated). Bad values give 422 ``invalid_url_param``.
* ``meta.pagination`` follows Pagy, which Stora's field names match (**inferred**):
  ``count`` = total matches, ``pages`` = ``last`` = max(1, ceil(count / limit)),
  ``next``/``prev`` page numbers or null.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from stora_sandbox import tokens
from stora_sandbox.models import Operator, TokenRow
from stora_sandbox.store import Store
from stora_sandbox.wire import bearer_token, request_id, stora_error

bp = Blueprint("api", __name__, url_prefix="/2025-09")

SCOPES = {
    "site": "public.site:read",
    "contact": "public.contact:read",
    "order": "public.order:read",
}
PLURALS = {"site": "sites", "contact": "contacts", "order": "orders"}
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
DEFAULT_LIMIT = 50
MAX_LIMIT = 100


class ApiError(Exception):
    """Abort the request with a Stora error envelope (``details`` for invalid_content)."""

    def __init__(
        self, code: str, message: str, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(code)
        self.code = code
        self.message = message
        self.details = details


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return stora_error(exc.code, exc.message, details=exc.details)


def get_store() -> Store:
    """The current app's store."""
    store: Store = current_app.extensions["stora_sandbox"]
    return store


def authorize(store: Store, scope: str) -> TokenRow:
    """Authenticate the bearer token (a Doorkeeper "use") and require ``scope``.

    Raises:
        ApiError: ``invalid_token`` (401) or ``forbidden`` (403).
    """
    row = tokens.authenticate_access_token(store, bearer_token())
    if row is None:
        raise ApiError("invalid_token", "The access token is invalid, expired or revoked.")
    g.client_id = row.client_id
    g.operator_id = row.operator_id
    if scope not in row.scopes:
        raise ApiError("forbidden", f"The access token does not have the {scope} scope.")
    return row


def curies(operator: Operator | None) -> list[dict[str, Any]]:
    """``meta.curies``: shared Backoffice host, per-operator Storefront host."""
    subdomain = operator.subdomain if operator else "app"
    return [
        {
            "name": "bo",
            "href": "https://app.stora.test{rel}",
            "templated": True,
            "title": "Backoffice",
        },
        {
            "name": "sf",
            "href": f"https://{subdomain}.stora.test{{rel}}",
            "templated": True,
            "title": "Storefront",
        },
    ]


def meta(store: Store, row: TokenRow) -> dict[str, Any]:
    """``meta`` of a response: request id and the operator's curies."""
    return {"request_id": request_id(), "curies": curies(store.get_operator(row.operator_id))}


# -- query parameters -----------------------------------------------------------------


def _int_param(name: str, default: int, low: int, high: int | None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError("invalid_url_param", f"{name} must be an integer.") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ApiError("invalid_url_param", f"{name} must be {bounds}.")
    return value


def _time_param(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.strip().replace(" ", "+"))
    except ValueError:
        raise ApiError("invalid_url_param", f"{name} must be an ISO 8601 timestamp.") from None
    # A bare date or a naive time is read as UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _choice_param(name: str, allowed: tuple[str, ...], default: str) -> str:
    value = request.args.get(name, default)
    if value not in allowed:
        raise ApiError("invalid_url_param", f"{name} must be one of: {', '.join(allowed)}.")
    return value


Filter = Callable[[Any], bool]


def _filters(kind: str) -> list[Filter]:
    """Build the record predicates the query string asks for."""
    predicates: list[Filter] = []
    bounds = {
        "created_after": lambda r, t: r.created_at >= t,
        "created_before": lambda r, t: r.created_at < t,
        "updated_after": lambda r, t: r.updated_at >= t,
        "updated_before": lambda r, t: r.updated_at < t,
    }
    for name, test in bounds.items():
        moment = _time_param(name)
        if moment is not None:
            predicates.append(lambda r, test=test, moment=moment: test(r, moment))
    if kind == "contact":
        email = request.args.get("email")
        if email:
            predicates.append(lambda r: str(r.data.get("email", "")).lower() == email.lower())
        statuses = request.args.get("status")
        if statuses:
            wanted = set(statuses.split(","))
            unknown = wanted - {"lead", "customer", "churned"}
            if unknown:
                raise ApiError("invalid_url_param", "status must be lead, customer or churned.")
            predicates.append(lambda r: r.data.get("status") in wanted)
    return predicates


def paginate(count: int, page: int, limit: int) -> dict[str, Any]:
    """Pagy-style pagination block for ``count`` records."""
    pages = max(1, math.ceil(count / limit))
    return {
        "count": count,
        "last": pages,
        "limit": limit,
        "next": page + 1 if page < pages else None,
        "page": page,
        "pages": pages,
        "prev": min(page - 1, pages) if page > 1 else None,
    }


# -- request bodies -------------------------------------------------------------------


def json_body() -> dict[str, Any]:
    """The request body as a JSON object; an empty body is ``{}``.

    Raises:
        ApiError: ``invalid_request`` (400) for a non-JSON content type, unparsable
            JSON or a JSON value that is not an object.
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    if not request.is_json:
        raise ApiError("invalid_request", "The request body must be JSON (application/json).")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "The request body must be a JSON object.")
    return body


class Problems:
    """Collects ``invalid_content`` details; :meth:`raise_if_any` raises them together."""

    def __init__(self) -> None:
        self.details: list[dict[str, str]] = []

    def add(self, pointer: str, problem: str) -> None:
        """Record ``value at `<pointer>` <problem>``."""
        self.details.append({"message": f"value at `{pointer}` {problem}", "pointer": pointer})

    def unknown_fields(self, body: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
        """Flag keys outside ``allowed`` when the ``reject_unknown_fields`` switch is on."""
        if not get_store().switches.reject_unknown_fields:
            return
        for key in body:
            if key not in allowed:
                self.add(f"{prefix}/{key}", "is not a permitted property")

    def raise_if_any(self) -> None:
        if self.details:
            raise ApiError(
                "invalid_content", "The request body content is not valid.", self.details
            )


# -- views ----------------------------------------------------------------------------


def list_response(
    store: Store,
    row: TokenRow,
    records: list[Any],
    plural: str,
    *,
    kind: str = "",
    sort_fields: tuple[str, ...] = ("created_at", "updated_at"),
    extra: list[Filter] | None = None,
    render: Callable[[Any], dict[str, Any]] = lambda r: r.data,
) -> Response:
    """Filter, sort and paginate ``records`` per the query string; answer the envelope.

    ``records`` carry ``created_at``/``updated_at`` datetimes, ``seq`` and ``data``.
    ``kind`` selects kind-specific filters; ``extra`` adds predicates.
    """
    page = _int_param("page", 1, 1, None)
    limit = _int_param("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    sort_by = _choice_param("sort_by", sort_fields, "created_at")
    direction = _choice_param("sort_direction", ("ASC", "DESC"), "DESC")
    predicates = _filters(kind) + (extra or [])
    chosen = [r for r in records if all(p(r) for p in predicates)]
    # seq breaks ties so records sharing a timestamp keep a stable order across pages.
    chosen.sort(key=lambda r: (getattr(r, sort_by), r.seq), reverse=direction == "DESC")
    pagination = paginate(len(chosen), page, limit)
    if page > pagination["last"] and store.switches.page_overflow == "error":
        raise ApiError("invalid_url_param", f"page must be between 1 and {pagination['last']}.")
    window = chosen[(page - 1) * limit : page * limit]
    body_meta = meta(store, row)
    body_meta["pagination"] = pagination
    return jsonify({plural: [render(r) for r in window], "meta": body_meta})


def _list(kind: str) -> Response:
    store = get_store()
    row = authorize(store, SCOPES[kind])
    records = store.list_resources(kind, row.operator_id)
    return list_response(store, row, records, PLURALS[kind], kind=kind)


def _show(kind: str, resource_id: str) -> Response:
    store = get_store()
    row = authorize(store, SCOPES[kind])
    resource = store.get_resource(kind, row.operator_id, resource_id)
    if resource is None:
        raise ApiError("resource_not_found", f"No {kind} found with id {resource_id}.")
    return jsonify({kind: resource.data, "meta": meta(store, row)})


@bp.get("/sites")
def list_sites() -> Response:
    return _list("site")


@bp.get("/sites/<site_id>")
def show_site(site_id: str) -> Response:
    return _show("site", site_id)


@bp.get("/contacts")
def list_contacts() -> Response:
    return _list("contact")


@bp.get("/contacts/<contact_id>")
def show_contact(contact_id: str) -> Response:
    return _show("contact", contact_id)


@bp.get("/orders")
def list_orders() -> Response:
    return _list("order")


@bp.get("/orders/<order_id>")
def show_order(order_id: str) -> Response:
    return _show("order", order_id)


@bp.route("/", defaults={"rest": ""}, methods=ALL_METHODS)
@bp.route("/<path:rest>", methods=ALL_METHODS)
def unknown_endpoint(rest: str) -> Response:
    """Anything else under the version prefix; routing fails before authentication."""
    return stora_error("invalid_endpoint", f"No route matches {request.method} {request.path}.")
