"""The partner staff dashboard. Every view requires a signed-in staff member."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from partner_app.connections import install
from partner_app.dashboard import queries
from partner_app.dashboard.forms import ConfirmForm, LoginForm
from partner_app.db import db
from partner_app.security import staff

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard")


@bp.before_request
def require_staff():
    if request.endpoint in ("dashboard.login",):
        return None
    if not current_user.is_authenticated:
        return current_app.login_manager.unauthorized()
    return None


@bp.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        user = staff.authenticate(form.email.data, form.password.data)
        if user is not None:
            db.session.commit()
            login_user(user)
            return redirect(url_for("dashboard.index"))
        flash("Those credentials did not match an active staff account.")
    return render_template("dashboard/login.html", form=form)


@bp.post("/logout")
@login_required
def logout():
    logout_user()
    return redirect(url_for("dashboard.login"))


@bp.get("/")
def index():
    return render_template("dashboard/index.html", operators=queries.operators_overview(),
                           form=ConfirmForm(), new_link=None)


@bp.post("/install-links")
def create_link():
    form = ConfirmForm()
    if not form.validate_on_submit():
        flash("The form expired; please try again.")
        return redirect(url_for("dashboard.index"))
    issued = install.create_install_link(settings=current_app.extensions["settings"],
                                         created_by=current_user.email, now=datetime.now(UTC))
    db.session.commit()
    return render_template("dashboard/index.html", operators=queries.operators_overview(),
                           form=ConfirmForm(), new_link=issued)
