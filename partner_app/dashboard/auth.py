"""Staff sign-in (password, then a TOTP code where enrolled), sign-out, and enrolment of
the second factor. Throttling, code checks and session stamps live in
:mod:`partner_app.security.staff`; these views pass the request's facts in and commit."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

from flask import (
    current_app,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_required, login_user, logout_user

from partner_app import audit
from partner_app.dashboard.blueprint import admin_required, bp
from partner_app.dashboard.forms import CodeForm, ConfirmForm, LoginForm
from partner_app.db import db
from partner_app.queueing import get_redis
from partner_app.security import staff


def _throttle() -> staff.LoginThrottle:
    return staff.LoginThrottle.from_settings(get_redis(), current_app.extensions["settings"])


def _safe_next(target: str | None) -> str:
    """Only a path inside the dashboard: never another host (open redirect)."""
    if target and target.startswith("/staff/") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return url_for("dashboard.index")


def _clear_session() -> None:
    """Empty the session, and forget the CSRF token this request may already have made
    from it (Flask-WTF caches it on ``g``): it belongs to the session just dropped."""
    session.clear()
    g.pop("csrf_token", None)


def _start(user) -> object:
    target = _safe_next(request.args.get("next"))
    _clear_session()  # nothing from before sign-in survives it (session fixation)
    login_user(user)
    session.permanent = True
    staff.start_session(session, now=time.time())
    return redirect(target)


def _throttled_page(template: str, form, retry_after: int):
    minutes = max(1, round(retry_after / 60))
    flash(f"Too many failed sign-in attempts. Try again in about {minutes} "
          f"minute{'s' if minutes != 1 else ''}.", "error")
    response = make_response(render_template(template, form=form), 429)
    response.headers["Retry-After"] = str(retry_after)
    return response


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.index"))
    form = LoginForm()
    if form.validate_on_submit():
        result = staff.sign_in_with_password(form.email.data, form.password.data,
                                             ip=request.remote_addr, throttle=_throttle())
        db.session.commit()
        if result.outcome == "signed_in":
            return _start(result.user)
        if result.outcome == "second_factor":
            _clear_session()
            staff.await_second_factor(session, result.user, now=time.time())
            return redirect(url_for("dashboard.login_code", next=request.args.get("next")))
        if result.outcome == "throttled":
            return _throttled_page("dashboard/login.html", form, result.retry_after)
        flash("Those credentials did not match an active staff account.", "error")
    return render_template("dashboard/login.html", form=form)


@bp.route("/login/code", methods=["GET", "POST"])
def login_code():
    user_id = staff.pending_second_factor(session, now=time.time())
    if user_id is None:
        flash("Please sign in again.", "error")
        return redirect(url_for("dashboard.login"))
    form = CodeForm()
    if form.validate_on_submit():
        result = staff.sign_in_with_code(user_id, form.code.data, ip=request.remote_addr,
                                         throttle=_throttle(),
                                         vault=current_app.extensions["vault"])
        db.session.commit()
        if result.outcome == "signed_in":
            return _start(result.user)
        if result.outcome == "throttled":
            return _throttled_page("dashboard/login_code.html", form, result.retry_after)
        flash("That code is not valid, or it was already used. Wait for the next one.",
              "error")
    return render_template("dashboard/login_code.html", form=form)


@bp.post("/logout")
@login_required
def logout():
    audit.record("staff.logout", actor_type="staff", actor=current_user.email,
                 staff_id=current_user.id)
    db.session.commit()
    logout_user()
    _clear_session()
    flash("You are signed out.", "info")
    return redirect(url_for("dashboard.login"))


@bp.get("/account")
def account():
    vault = current_app.extensions["vault"]
    enrolling = current_user.totp_secret_ct is not None and not current_user.totp_enabled
    uri = staff.totp_uri(current_user, vault=vault) if enrolling else None
    key = parse_qs(urlsplit(uri).query)["secret"][0] if uri else None
    response = make_response(render_template(
        "dashboard/account.html", uri=uri, key=key, form=ConfirmForm(), code_form=CodeForm()))
    response.headers["Cache-Control"] = "no-store"  # the enrolment secret is on it
    return response


@bp.post("/account/totp")
@admin_required
def totp_begin():
    if not ConfirmForm().validate_on_submit():
        flash("The form expired; please try again.", "error")
        return redirect(url_for("dashboard.account"))
    try:
        staff.begin_totp_enrolment(current_user, vault=current_app.extensions["vault"])
    except staff.StaffError as exc:
        flash(str(exc), "error")
        return redirect(url_for("dashboard.account"))
    db.session.commit()
    return redirect(url_for("dashboard.account"))


@bp.post("/account/totp/confirm")
@admin_required
def totp_confirm():
    form = CodeForm()
    if not form.validate_on_submit():
        flash("Enter the 6 digits your authenticator app shows.", "error")
        return redirect(url_for("dashboard.account"))
    try:
        ok = staff.confirm_totp_enrolment(current_user, form.code.data,
                                          vault=current_app.extensions["vault"])
    except staff.StaffError as exc:
        flash(str(exc), "error")
        return redirect(url_for("dashboard.account"))
    db.session.commit()
    if ok:
        flash("Two-step sign-in is on: you will be asked for a code after your password.",
              "info")
    else:
        flash("That code does not match. Check the time on your phone and try the next "
              "code.", "error")
    return redirect(url_for("dashboard.account"))
