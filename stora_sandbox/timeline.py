"""Timeline API ("External Events") on the ``/2025-09`` blueprint.

Routes (shared/stora-api/timeline.md §3):

* ``GET /timeline/sources`` (``public.timeline_source:read``): the global sources plus
  the operator's own, paginated and filterable like every list
  (``created_after`` …, ``sort_by``, ``sort_direction``).
* ``GET /timeline/templates`` and ``GET /timeline/templates/<id>``
  (``public.timeline_template:read``): global templates plus the operator's own.
* ``POST /timeline/events`` (``public.timeline_event:write``): 201
  ``{"event": {...}, "meta": {...}}``, the envelope key of the docs' example.
* ``PATCH /timeline/events/<id>`` (``public.timeline_event:write``): 200, same envelope;
  any event of the token's operator, whichever application created it.

Event body (all references are ``{"id": ...}``):

* ``source`` and ``template``: required on create, never null; must name a source or
  template the operator can see.
* ``contact``, ``site``, ``invoice``, ``subscription``, ``tenancy``, ``unit``,
  ``unit_type``: optional, null or a reference with the resource's id prefix; contacts
  and sites must exist for the operator. Every *predefined* variable of the template
  that names one of these (e.g. ``contact``) must be set: Stora tells partners to check
  a template's required predefined variables (**inferred**: enforced).
* ``variables``: optional object of strings, numbers, booleans or nulls; custom
  variables are not checked against the template, as Stora says.
* ``description``: optional string or null. ``external``: optional null or
  ``{"id": non-empty string, "url"?: absolute http(s) URL or null}``.
* Other fields are rejected under ``reject_unknown_fields`` (default on).

Errors: 400 ``invalid_request`` for a body that is not a JSON object; 422
``invalid_content`` listing every problem with its JSON pointer; 404
``resource_not_found`` for another operator's or an unknown event on PATCH. A PATCH
replaces the fields it names (``variables`` as a whole) and bumps ``updated_at``.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Response, g, jsonify

from stora_sandbox import seed
from stora_sandbox.api import (
    ApiError,
    Problems,
    authorize,
    bp,
    get_store,
    json_body,
    list_response,
    meta,
)
from stora_sandbox.models import Resource
from stora_sandbox.store import Store

SOURCE_SCOPE = "public.timeline_source:read"
TEMPLATE_SCOPE = "public.timeline_template:read"
EVENT_SCOPE = "public.timeline_event:write"

# Related records an event may link, with the id prefix each must carry.
RELATED: dict[str, str] = {
    "contact": "con_",
    "site": "site_",
    "invoice": "inv_",
    "subscription": "sub_",
    "tenancy": "ten_",
    "unit": "unit_",
    "unit_type": "utype_",
}
# Related kinds the sandbox stores, so their existence is checked.
CHECKED_KINDS = frozenset({"contact", "site"})
EVENT_FIELDS = frozenset({"source", "template", "description", "external", "variables", *RELATED})


# -- reads ----------------------------------------------------------------------------


@bp.get("/timeline/sources")
def list_sources() -> Response:
    store = get_store()
    row = authorize(store, SOURCE_SCOPE)
    records = store.list_visible("timeline_source", row.operator_id)
    return list_response(store, row, records, "sources")


@bp.get("/timeline/templates")
def list_templates() -> Response:
    store = get_store()
    row = authorize(store, TEMPLATE_SCOPE)
    records = store.list_visible("timeline_template", row.operator_id)
    return list_response(store, row, records, "templates")


@bp.get("/timeline/templates/<template_id>")
def show_template(template_id: str) -> Response:
    store = get_store()
    row = authorize(store, TEMPLATE_SCOPE)
    template = store.get_visible("timeline_template", row.operator_id, template_id)
    if template is None:
        raise ApiError("resource_not_found", f"No template found with id {template_id}.")
    return jsonify({"template": template.data, "meta": meta(store, row)})


# -- writes ---------------------------------------------------------------------------


def _reference(problems: Problems, value: Any, pointer: str) -> str | None:
    """The id of a ``{"id": ...}`` reference, or None after recording a problem."""
    if not isinstance(value, dict):
        problems.add(pointer, "is not an object")
        return None
    problems.unknown_fields(value, {"id"}, pointer)
    ref_id = value.get("id")
    if not isinstance(ref_id, str) or not ref_id:
        problems.add(f"{pointer}/id", "is not a non-empty string")
        return None
    return ref_id


def _check_external(problems: Problems, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.add("/external", "is not an object")
        return None
    problems.unknown_fields(value, {"id", "url"}, "/external")
    ext_id, url = value.get("id"), value.get("url")
    if not isinstance(ext_id, str) or not ext_id:
        problems.add("/external/id", "is not a non-empty string")
    if url is not None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            problems.add("/external/url", "does not match format: uri")
    return {"id": ext_id, "url": url}


def _check_variables(problems: Problems, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        problems.add("/variables", "is not an object")
        return {}
    for name, item in value.items():
        if isinstance(item, dict | list):
            problems.add(f"/variables/{name}", "is not a string, number, boolean or null")
    return dict(value)


def _validated(
    store: Store, operator_id: str, body: dict[str, Any], *, creating: bool
) -> dict[str, Any]:
    """Check ``body`` and return the wire values of the fields it sets.

    Raises:
        ApiError: ``invalid_content`` with every problem found.
    """
    problems = Problems()
    problems.unknown_fields(body, set(EVENT_FIELDS))
    values: dict[str, Any] = {}
    for name, kind, label in (
        ("source", "timeline_source", "timeline source"),
        ("template", "timeline_template", "timeline template"),
    ):
        if name not in body:
            if creating:
                problems.add(f"/{name}", "is required")
            continue
        ref_id = _reference(problems, body[name], f"/{name}")
        if ref_id is None:
            continue
        if store.get_visible(kind, operator_id, ref_id) is None:
            problems.add(f"/{name}/id", f"does not reference an existing {label}")
            continue
        values[name] = {"id": ref_id}
    for name, prefix in RELATED.items():
        if name not in body:
            continue
        if body[name] is None:
            values[name] = None
            continue
        ref_id = _reference(problems, body[name], f"/{name}")
        if ref_id is None:
            continue
        if not ref_id.startswith(prefix):
            problems.add(f"/{name}/id", f"does not match pattern: ^{prefix}")
        elif name in CHECKED_KINDS and store.get_resource(name, operator_id, ref_id) is None:
            problems.add(f"/{name}/id", f"does not reference an existing {name}")
        else:
            values[name] = {"id": ref_id}
    if "description" in body:
        description = body["description"]
        if description is not None and not isinstance(description, str):
            problems.add("/description", "is not a string")
        values["description"] = description
    if "external" in body:
        values["external"] = _check_external(problems, body["external"])
    if "variables" in body:
        values["variables"] = _check_variables(problems, body["variables"])
    problems.raise_if_any()
    return values


def _require_predefined(store: Store, operator_id: str, event: dict[str, Any]) -> None:
    """422 unless every predefined variable of the template that names a related
    record is set on the event."""
    template = store.get_visible("timeline_template", operator_id, event["template"]["id"])
    if template is None:
        return
    problems = Problems()
    for name in template.data["variables"]["predefined"]:
        if name in RELATED and event.get(name) is None:
            problems.add(f"/{name}", f"is required by template {template.id}")
    problems.raise_if_any()


@bp.post("/timeline/events")
def create_event() -> tuple[Response, int]:
    store = get_store()
    row = authorize(store, EVENT_SCOPE)
    body = json_body()
    values = _validated(store, row.operator_id, body, creating=True)
    now = seed.iso(datetime.fromtimestamp(store.now(), UTC))
    event: dict[str, Any] = {
        "id": f"aevt_{secrets.token_hex(8)}",
        "contact": values.get("contact"),
        "created_at": now,
        "creator": {"id": seed.application_public_id(row.client_id)},
        "description": values.get("description"),
        "external": values.get("external"),
        "invoice": values.get("invoice"),
        "site": values.get("site"),
        "source": values["source"],
        "subscription": values.get("subscription"),
        "template": values["template"],
        "tenancy": values.get("tenancy"),
        "unit": values.get("unit"),
        "unit_type": values.get("unit_type"),
        "updated_at": now,
        "variables": values.get("variables", {}),
    }
    _require_predefined(store, row.operator_id, event)
    moment = seed.parse_time(now)
    store.add_resource(
        Resource(
            kind="timeline_event",
            id=event["id"],
            operator_id=row.operator_id,
            created_at=moment,
            updated_at=moment,
            seq=store.next_resource_seq(),
            data=event,
            client_id=row.client_id,
        )
    )
    g.operator_id = row.operator_id
    return jsonify({"event": event, "meta": meta(store, row)}), 201


@bp.patch("/timeline/events/<event_id>")
def update_event(event_id: str) -> Response:
    store = get_store()
    row = authorize(store, EVENT_SCOPE)
    existing = store.get_resource("timeline_event", row.operator_id, event_id)
    if existing is None:
        raise ApiError("resource_not_found", f"No event found with id {event_id}.")
    body = json_body()
    values = _validated(store, row.operator_id, body, creating=False)
    with store.lock:
        now = seed.iso(datetime.fromtimestamp(store.now(), UTC))
        event = {**existing.data, **values, "updated_at": now}
        _require_predefined(store, row.operator_id, event)
        # Replace rather than mutate: a concurrent response may be serialising it.
        existing.data, existing.updated_at = event, seed.parse_time(now)
    return jsonify({"event": event, "meta": meta(store, row)})


# -- rendering (for the admin view) ---------------------------------------------------

_IF_GLOBAL = re.compile(r"{%\s*if\s+global_context\s*%}(.*?){%\s*endif\s*%}", re.DOTALL)
_VARIABLE = re.compile(r"{{\s*(\w+)\s*}}")


def render_message(store: Store, event: Resource, *, global_context: bool = True) -> str | None:
    """The event's template message with its variables filled in, as the account-wide
    timeline would show it (``global_context`` true); None if the template is gone.

    Custom variables come from ``variables``; predefined ones naming a related record
    show a stored contact's ``full_name`` or site's ``name``, else the record id.
    """
    operator_id = event.operator_id or ""
    template = store.get_visible("timeline_template", operator_id, event.data["template"]["id"])
    if template is None:
        return None
    text = _IF_GLOBAL.sub(lambda m: m.group(1) if global_context else "", template.data["message"])

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in RELATED and isinstance(event.data.get(name), dict):
            ref_id = event.data[name]["id"]
            record = (
                store.get_resource(name, operator_id, ref_id) if name in CHECKED_KINDS else None
            )
            if record is not None:
                return str(record.data.get("full_name") or record.data.get("name") or ref_id)
            return str(ref_id)
        found = event.data.get("variables", {}).get(name)
        return "" if found is None else str(found)

    return _VARIABLE.sub(value, text)
