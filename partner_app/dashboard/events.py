"""The webhook inbox: every verified delivery, filterable, with its payload and a replay."""

from __future__ import annotations

import json

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user

from partner_app.dashboard import actions, queries
from partner_app.dashboard.blueprint import admin_required, bp
from partner_app.dashboard.forms import ConfirmForm
from partner_app.db import db
from partner_app.stora.signatures import HEADER as SIGNATURE_HEADER
from partner_app.webhooks.handlers import handled_types
from partner_app.webhooks.models import InboxStatus

STATUSES = tuple(status.value for status in InboxStatus)


def _cursor(name: str) -> int | None:
    value = request.args.get(name, "")
    return int(value) if value.isdigit() else None


@bp.get("/events")
def events():
    status = request.args.get("status") or None
    filters = {"operator": (request.args.get("operator") or "").strip()[:40] or None,
               "type": (request.args.get("type") or "").strip()[:100] or None,
               "status": status if status in STATUSES else None}
    page = queries.events_page(operator_public_id=filters["operator"],
                               event_type=filters["type"], status=filters["status"],
                               before=_cursor("before"), after=_cursor("after"))
    return render_template("dashboard/events.html", page=page, filters=filters,
                           statuses=STATUSES, known_types=handled_types())


def pretty_payload(body: str) -> str:
    """The stored body as indented JSON, or as stored if it is not JSON."""
    try:
        return json.dumps(json.loads(body), indent=2, sort_keys=True, ensure_ascii=False)
    except ValueError:
        return body


def shown_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The stored headers, with the signature reduced to its timestamp: the HMAC values
    are of no use to a reader and need not be on a screen."""
    shown = []
    for name, value in sorted((headers or {}).items()):
        if name.lower() == SIGNATURE_HEADER.lower():
            stamp = [part for part in str(value).split(",") if part.strip().startswith("t=")]
            value = (stamp[0].strip() + ", " if stamp else "") + "signature values hidden"
        shown.append((name, value))
    return shown


@bp.get("/events/<int:event_row_id>")
def event(event_row_id: int):
    found = queries.event_detail(event_row_id)
    if found is None:
        abort(404)
    inbox_event, operator = found
    return render_template("dashboard/event.html", event=inbox_event, operator=operator,
                           payload=pretty_payload(inbox_event.body),
                           headers=shown_headers(inbox_event.headers), form=ConfirmForm())


@bp.post("/events/<int:event_row_id>/replay")
@admin_required
def event_replay(event_row_id: int):
    found = queries.event_detail(event_row_id)
    if found is None:
        abort(404)
    if not ConfirmForm().validate_on_submit():
        flash("The form expired; please try again.", "error")
        return redirect(url_for("dashboard.event", event_row_id=event_row_id))
    inbox_event, _ = found
    actions.record_replay(inbox_event, staff=current_user)
    db.session.commit()
    actions.send_replay(event_row_id)  # only once the audit entry is durable
    flash(f"Replay of event {event_row_id} queued.", "info")
    return redirect(url_for("dashboard.event", event_row_id=event_row_id))
