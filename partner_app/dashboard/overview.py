"""The overview page: the platform at a glance."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import current_app, flash, redirect, render_template, url_for
from flask_login import current_user

from partner_app.connections import install
from partner_app.dashboard import queries
from partner_app.dashboard.blueprint import admin_required, bp
from partner_app.dashboard.forms import ConfirmForm
from partner_app.db import db


@bp.get("/")
def index():
    return render_template("dashboard/index.html", operators=queries.operators_overview(),
                           form=ConfirmForm(), new_link=None)


@bp.post("/install-links")
@admin_required
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
