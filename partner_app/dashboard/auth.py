"""Staff sign-in and sign-out."""

from __future__ import annotations

from flask import flash, redirect, render_template, url_for
from flask_login import login_required, login_user, logout_user

from partner_app.dashboard.blueprint import bp
from partner_app.dashboard.forms import LoginForm
from partner_app.db import db
from partner_app.security import staff


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
