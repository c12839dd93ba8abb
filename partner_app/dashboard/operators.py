"""Operator pages: the searchable list, one operator's detail, and the staff actions.

Reads go through :mod:`partner_app.dashboard.queries`; actions through
:mod:`partner_app.dashboard.actions` (the platform's own services). Every action is an
admin-only POST carrying a CSRF token; the destructive one (disconnect) asks for the
operator's public id to be typed back first.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user

from partner_app.connections.disconnect import DisconnectFailed
from partner_app.connections.models import OperatorStatus
from partner_app.dashboard import actions, queries
from partner_app.dashboard.blueprint import admin_required, bp
from partner_app.dashboard.forms import ConfirmForm, DisconnectForm
from partner_app.db import db

STATUSES = tuple(status.value for status in OperatorStatus)
MAX_SEARCH = 100


def _cursor(name: str) -> int | None:
    value = request.args.get(name, "")
    return int(value) if value.isdigit() else None


def _list_args() -> dict:
    status = request.args.get("status") or None
    return {"search": (request.args.get("q") or "")[:MAX_SEARCH],
            "status": status if status in STATUSES else None}


def _render_list(new_link=None):
    args = _list_args()
    page = queries.operators_page(**args, before=_cursor("before"), after=_cursor("after"))
    return render_template("dashboard/operators.html", page=page, counts=queries.
                           operators_by_status(), statuses=STATUSES, new_link=new_link,
                           form=ConfirmForm(), **args)


@bp.get("/operators")
def operators():
    return _render_list()


@bp.post("/install-links")
@admin_required
def create_link():
    if not ConfirmForm().validate_on_submit():
        flash("The form expired; please try again.", "error")
        return redirect(url_for("dashboard.operators"))
    issued = actions.new_install_link(staff=current_user, settings=_settings(),
                                      now=datetime.now(UTC))
    db.session.commit()
    # Shown once, in this response only: the URL holds the link's only secret.
    return _render_list(new_link=issued)


def _settings():
    return current_app.extensions["settings"]


def _detail_or_404(public_id: str) -> queries.OperatorDetail:
    detail = queries.operator_detail(public_id)
    if detail is None:
        abort(404)
    return detail


def _render_detail(detail: queries.OperatorDetail, *, new_link=None, status: int = 200):
    operator = detail.operator
    subscriptions = queries.operator_subscriptions(operator.id)
    events = queries.recent_events(operator.id)
    sync_items = queries.recent_sync_items(operator.id)
    posts = queries.recent_timeline_posts(operator.id)
    timeline = queries.operator_timeline(detail, subscriptions=subscriptions, events=events,
                                         sync_items=sync_items, timeline_posts=posts)
    return render_template(
        "dashboard/operator.html", detail=detail, operator=operator,
        scopes=queries.scope_check(detail.token_scope or operator.scopes,
                                   _settings().stora_scopes),
        subscriptions=subscriptions, events=events, sync_items=sync_items,
        timeline_posts=posts, timeline=timeline, form=ConfirmForm(), new_link=new_link,
        connected=operator.status != OperatorStatus.DISCONNECTED), status


@bp.get("/operators/<public_id>")
def operator(public_id: str):
    return _render_detail(_detail_or_404(public_id))


def _action_target(public_id: str):
    """The operator an action is for, once its form's CSRF token checked out."""
    detail = _detail_or_404(public_id)
    if not ConfirmForm().validate_on_submit():
        flash("The form expired; please try again.", "error")
        return detail, redirect(url_for("dashboard.operator", public_id=public_id))
    return detail, None


def _back(public_id: str):
    return redirect(url_for("dashboard.operator", public_id=public_id))


@bp.post("/operators/<public_id>/refresh")
@admin_required
def operator_refresh(public_id: str):
    detail, stop = _action_target(public_id)
    if stop:
        return stop
    outcome = actions.refresh_tokens_now(detail.operator, staff=current_user,
                                         vault=current_app.extensions["vault"],
                                         oauth=current_app.extensions["stora_oauth"])
    db.session.commit()
    if outcome.refreshed:
        flash("Tokens refreshed.", "info")
    else:
        flash(f"Tokens not refreshed: {outcome.reason}.", "error")
    return _back(public_id)


@bp.post("/operators/<public_id>/sync")
@admin_required
def operator_sync(public_id: str):
    detail, stop = _action_target(public_id)
    if stop:
        return stop
    run = actions.run_sync(detail.operator, staff=current_user)
    db.session.commit()
    flash(f"Orders sync run {run.id} started.", "info")
    return _back(public_id)


@bp.post("/operators/<public_id>/reconcile")
@admin_required
def operator_reconcile(public_id: str):
    detail, stop = _action_target(public_id)
    if stop:
        return stop
    actions.reconcile_webhooks(detail.operator, staff=current_user, now=datetime.now(UTC))
    db.session.commit()
    flash("Webhook reconcile queued.", "info")
    return _back(public_id)


@bp.post("/operators/<public_id>/reconnect-link")
@admin_required
def operator_reconnect_link(public_id: str):
    detail, stop = _action_target(public_id)
    if stop:
        return stop
    issued = actions.reconnect_link(detail.operator, staff=current_user, settings=_settings(),
                                    now=datetime.now(UTC))
    db.session.commit()
    # Rendered, not redirected: the URL holds the link's only secret and is shown once.
    return _render_detail(queries.operator_detail(public_id), new_link=issued)


@bp.route("/operators/<public_id>/disconnect", methods=["GET", "POST"])
@admin_required
def operator_disconnect(public_id: str):
    detail = _detail_or_404(public_id)
    operator = detail.operator
    form = DisconnectForm()
    if request.method == "POST" and form.validate_on_submit():
        if form.confirm.data.strip() != operator.public_id:
            form.confirm.errors.append("That is not this operator's public id.")
        else:
            try:
                result = actions.disconnect(
                    operator, staff=current_user, vault=current_app.extensions["vault"],
                    oauth=current_app.extensions["stora_oauth"], now=datetime.now(UTC),
                    revoke=not form.local_only.data)
            except DisconnectFailed as exc:
                db.session.rollback()
                flash(f"Not disconnected: {exc.reason}. Nothing was changed; try again, or "
                      "disconnect here only.", "error")
                return render_template("dashboard/confirm_disconnect.html", form=form,
                                       operator=operator), 409
            db.session.commit()
            if result.already_disconnected:
                flash(f"{public_id} was already disconnected.", "info")
            else:
                flash(f"{public_id} disconnected; revoked at Stora: "
                      f"{'yes' if result.revoked_at_stora else 'no'}; keys destroyed: "
                      f"{result.destroyed_keys}.", "info")
            return _back(public_id)
    status = 422 if request.method == "POST" else 200
    return render_template("dashboard/confirm_disconnect.html", form=form,
                           operator=operator), status
