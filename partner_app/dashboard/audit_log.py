"""The audit log: who did what, when; filterable, keyset-paginated."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from flask import render_template, request

from partner_app.dashboard import queries
from partner_app.dashboard.blueprint import bp
from partner_app.dashboard.forms import AuditFilterForm

PAGE_SIZE = 50


def _day_start(day) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


@bp.get("/audit")
def audit_log():
    form = AuditFilterForm(formdata=request.args)
    errors: list[str] = []
    before = request.args.get("before", type=int)
    if request.args.get("before") and before is None:
        errors.append("The page marker is not valid; showing the newest entries.")
    valid = form.validate()
    operator_id = None
    if valid and form.operator.data:
        operator_id = queries.operator_id_for(form.operator.data)
        if operator_id is None:
            errors.append(f"No operator has the id {form.operator.data}.")
            valid = False
    if valid and form.since.data and form.until.data and form.since.data > form.until.data:
        errors.append("“From” is after “To”.")
        valid = False
    if not valid:
        # Show what was typed, what is wrong with it, and no rows: a filter silently
        # dropped would show entries the reader did not ask for.
        return render_template("dashboard/audit_log.html", form=form, page=None,
                               errors=errors, actions=queries.audit_actions()), 400
    filters = queries.AuditFilters(
        actor=(form.actor.data or "").strip() or None,
        action=form.action.data or None,
        operator_id=operator_id,
        since=_day_start(form.since.data) if form.since.data else None,
        until=_day_start(form.until.data) + timedelta(days=1) if form.until.data else None)
    page = queries.audit_page(filters, before=before, limit=PAGE_SIZE)
    next_args = {k: v for k, v in request.args.items() if k != "before" and v}
    return render_template("dashboard/audit_log.html", form=form, page=page, errors=errors,
                           actions=queries.audit_actions(), next_args=next_args)
