"""Webhook Endpoints API on the ``/2025-09`` blueprint (shared/stora-api/webhooks.md §2).

* ``GET /webhook_endpoints`` (``public.webhook_endpoint:read``): ``{"endpoints": [...],
  "meta": {..., "pagination"}}``; ``page``, ``limit``, ``sort_by`` (``created_at``
  only), ``sort_direction``, ``created_after`` …, ``status`` (``enabled``, ``disabled``,
  comma-separated) and ``metadata`` filters. ``metadata`` is given as
  ``metadata[key]=value`` pairs (the OpenAPI deepObject style, **inferred**) or as one
  ``metadata=<JSON object>``; an endpoint matches when every pair equals its metadata
  value (strings as is, numbers and booleans in JSON spelling).
* ``POST /webhook_endpoints`` (``public.webhook_endpoint:write``): 201 ``{"endpoint"}``
  with the generated ``secret`` (64 hex characters). This is the only response that
  carries it; list, show, update and disable return ``"secret": null``. Body:
  ``name`` (non-empty string), ``api_version`` (``"2025-09"``), ``url``,
  ``event_types`` (non-empty list of distinct known types) required; ``description``
  (string or null), ``metadata`` (object of strings, numbers, booleans or nulls)
  optional.
* ``GET /webhook_endpoints/<id>`` (read) and ``PATCH /webhook_endpoints/<id>`` (write):
  PATCH takes ``name``, ``description``, ``url``, ``event_types``, ``metadata``
  (replaced as a whole) and ``api_version`` (``"2025-09"`` only), all optional.
* ``POST /webhook_endpoints/<id>/disable`` (write): ``status: "disabled"``,
  ``disabled_at`` set (kept if already disabled); 200 ``{"endpoint"}``. Pending
  deliveries to it are dropped when they come due.
* ``POST /webhook_endpoints/<id>/enable`` (write): only with the
  ``webhook_enable_endpoint`` switch (otherwise 404 ``invalid_endpoint``, as an unknown
  route); clears ``disabled_at`` and the failure count.

``url`` must be ``https://`` with a host; ``http://`` is accepted for loopback hosts
(``localhost``, ``127.0.0.0/8``, ``::1``) while ``allow_http_loopback_webhooks`` is on.
Another operator's endpoint is 404 ``resource_not_found``; bad bodies are 422
``invalid_content`` with pointers, as everywhere.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Response, g, jsonify, request

from stora_sandbox import seed
from stora_sandbox.api import (
    ApiError,
    Filter,
    Problems,
    authorize,
    bp,
    get_store,
    json_body,
    list_response,
    meta,
)
from stora_sandbox.config import API_VERSION, EVENT_TYPES
from stora_sandbox.models import WebhookEndpoint
from stora_sandbox.store import Store, canary_token
from stora_sandbox.wire import stora_error

READ_SCOPE = "public.webhook_endpoint:read"
WRITE_SCOPE = "public.webhook_endpoint:write"
CREATE_FIELDS = frozenset({"name", "api_version", "url", "event_types", "description", "metadata"})
METADATA_PARAM = re.compile(r"metadata\[([^\]]+)\]")


def public_view(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    """The wire shape; ``secret`` is null unless ``with_secret`` (the create response)."""
    data = dict(endpoint.data)
    if with_secret:
        data["secret"] = endpoint.secret
    return data


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(store: Store, problems: Problems, value: Any) -> str | None:
    if not isinstance(value, str):
        problems.add("/url", "is not a string")
        return None
    parts = urlsplit(value)
    host = parts.hostname or ""
    if value != value.strip() or not host:
        problems.add("/url", "does not match format: uri")
        return None
    if parts.scheme == "https":
        return value
    if (
        parts.scheme == "http"
        and store.switches.allow_http_loopback_webhooks
        and _is_loopback(host)
    ):
        return value
    problems.add("/url", "does not match pattern: ^https://")
    return None


def _check_event_types(problems: Problems, value: Any) -> list[str] | None:
    if not isinstance(value, list) or not value:
        problems.add("/event_types", "is not a non-empty array")
        return None
    seen: set[str] = set()
    valid = True
    for index, item in enumerate(value):
        if not isinstance(item, str) or item not in EVENT_TYPES:
            problems.add(f"/event_types/{index}", f"is not one of: {', '.join(EVENT_TYPES)}")
            valid = False
        elif item in seen:
            problems.add(f"/event_types/{index}", "is a duplicate item")
            valid = False
        else:
            seen.add(item)
    return list(value) if valid else None


def _check_metadata(problems: Problems, value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        problems.add("/metadata", "is not an object")
        return None
    for key, item in value.items():
        if isinstance(item, dict | list):
            problems.add(f"/metadata/{key}", "is not a string, number, boolean or null")
    return dict(value)


def _validated(store: Store, body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """Check a create or update body; return the wire values it sets.

    Raises:
        ApiError: ``invalid_content`` listing every problem.
    """
    problems = Problems()
    problems.unknown_fields(body, set(CREATE_FIELDS))
    values: dict[str, Any] = {}
    if creating:
        for name in ("name", "api_version", "url", "event_types"):
            if name not in body:
                problems.add(f"/{name}", "is required")
    if "name" in body:
        if isinstance(body["name"], str) and body["name"].strip():
            values["name"] = body["name"]
        else:
            problems.add("/name", "is not a non-empty string")
    if "api_version" in body:
        if body["api_version"] == API_VERSION:
            values["api_version"] = API_VERSION
        else:
            problems.add("/api_version", f"is not one of: {API_VERSION}")
    if "url" in body:
        url = _check_url(store, problems, body["url"])
        if url is not None:
            values["url"] = url
    if "event_types" in body:
        event_types = _check_event_types(problems, body["event_types"])
        if event_types is not None:
            values["event_types"] = event_types
    if "description" in body:
        description = body["description"]
        if description is None or isinstance(description, str):
            values["description"] = description
        else:
            problems.add("/description", "is not a string")
    if "metadata" in body:
        metadata = _check_metadata(problems, body["metadata"])
        if metadata is not None:
            values["metadata"] = metadata
    problems.raise_if_any()
    return values


def _metadata_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _list_filters() -> list[Filter]:
    predicates: list[Filter] = []
    statuses = request.args.get("status")
    if statuses:
        wanted = {s.strip() for s in statuses.split(",") if s.strip()}
        if not wanted or not wanted <= {"enabled", "disabled"}:
            raise ApiError("invalid_url_param", "status must be enabled or disabled.")
        predicates.append(lambda e: e.data["status"] in wanted)
    pairs: dict[str, str] = {}
    for name, value in request.args.items():
        match = METADATA_PARAM.fullmatch(name)
        if match:
            pairs[match.group(1)] = value
    if "metadata" in request.args:
        try:
            parsed = json.loads(request.args["metadata"])
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ApiError(
                "invalid_url_param", "metadata must be metadata[key]=value or a JSON object."
            )
        pairs.update({k: _metadata_text(v) or "" for k, v in parsed.items()})
    if pairs:
        predicates.append(
            lambda e: all(_metadata_text(e.data["metadata"].get(k)) == v for k, v in pairs.items())
        )
    return predicates


def _endpoint(store: Store, operator_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = store.get_webhook_endpoint(endpoint_id, operator_id)
    if endpoint is None:
        raise ApiError("resource_not_found", f"No webhook endpoint found with id {endpoint_id}.")
    return endpoint


def _now(store: Store) -> str:
    return seed.iso(datetime.fromtimestamp(store.now(), UTC))


@bp.get("/webhook_endpoints")
def list_endpoints() -> Response:
    store = get_store()
    row = authorize(store, READ_SCOPE)
    return list_response(
        store,
        row,
        store.list_webhook_endpoints(row.operator_id),
        "endpoints",
        sort_fields=("created_at",),
        extra=_list_filters(),
        render=public_view,
    )


@bp.post("/webhook_endpoints")
def create_endpoint() -> tuple[Response, int]:
    store = get_store()
    row = authorize(store, WRITE_SCOPE)
    values = _validated(store, json_body(), creating=True)
    now = _now(store)
    data = {
        "id": f"we_{secrets.token_hex(8)}",
        "api_version": values["api_version"],
        "created_at": now,
        "creator": {"id": seed.application_public_id(row.client_id)},
        "description": values.get("description"),
        "disabled_at": None,
        "event_types": values["event_types"],
        "metadata": values.get("metadata", {}),
        "name": values["name"],
        "secret": None,
        "status": "enabled",
        "updated_at": now,
        "url": values["url"],
    }
    moment = seed.parse_time(now)
    endpoint = WebhookEndpoint(
        id=data["id"],
        operator_id=row.operator_id,
        client_id=row.client_id,
        secret=canary_token("whsec", store.canary, secrets.token_hex(32)),
        created_at=moment,
        updated_at=moment,
        seq=store.next_resource_seq(),
        data=data,
    )
    store.add_webhook_endpoint(endpoint)
    g.operator_id = row.operator_id
    body = {"endpoint": public_view(endpoint, with_secret=True), "meta": meta(store, row)}
    return jsonify(body), 201


@bp.get("/webhook_endpoints/<endpoint_id>")
def show_endpoint(endpoint_id: str) -> Response:
    store = get_store()
    row = authorize(store, READ_SCOPE)
    endpoint = _endpoint(store, row.operator_id, endpoint_id)
    return jsonify({"endpoint": public_view(endpoint), "meta": meta(store, row)})


@bp.patch("/webhook_endpoints/<endpoint_id>")
def update_endpoint(endpoint_id: str) -> Response:
    store = get_store()
    row = authorize(store, WRITE_SCOPE)
    endpoint = _endpoint(store, row.operator_id, endpoint_id)
    values = _validated(store, json_body(), creating=False)
    with store.lock:
        now = _now(store)
        # Replace rather than mutate: a concurrent response may be serialising it.
        endpoint.data = {**endpoint.data, **values, "updated_at": now}
        endpoint.updated_at = seed.parse_time(now)
    return jsonify({"endpoint": public_view(endpoint), "meta": meta(store, row)})


def _set_status(endpoint_id: str, enabled: bool) -> Response:
    store = get_store()
    row = authorize(store, WRITE_SCOPE)
    endpoint = _endpoint(store, row.operator_id, endpoint_id)
    with store.lock:
        status = "enabled" if enabled else "disabled"
        if endpoint.data["status"] != status:
            now = _now(store)
            endpoint.data = {
                **endpoint.data,
                "disabled_at": None if enabled else now,
                "status": status,
                "updated_at": now,
            }
            endpoint.updated_at = seed.parse_time(now)
        if enabled:
            endpoint.consecutive_failures = 0
    return jsonify({"endpoint": public_view(endpoint), "meta": meta(store, row)})


@bp.post("/webhook_endpoints/<endpoint_id>/disable")
def disable_endpoint(endpoint_id: str) -> Response:
    return _set_status(endpoint_id, enabled=False)


@bp.post("/webhook_endpoints/<endpoint_id>/enable")
def enable_endpoint(endpoint_id: str) -> Response:
    if not get_store().switches.webhook_enable_endpoint:
        return stora_error("invalid_endpoint", f"No route matches POST {request.path}.")
    return _set_status(endpoint_id, enabled=True)
