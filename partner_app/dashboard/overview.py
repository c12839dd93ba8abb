"""The overview page: the platform at a glance."""

from __future__ import annotations

from flask import render_template

from partner_app.dashboard import queries
from partner_app.dashboard.blueprint import bp
from partner_app.dashboard.forms import ConfirmForm


@bp.get("/")
def index():
    return render_template("dashboard/index.html", operators=queries.operators_overview(),
                           form=ConfirmForm(), new_link=None)
