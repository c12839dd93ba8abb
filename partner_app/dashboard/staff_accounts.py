"""Staff accounts: everyone may see the list; admins add members, deactivate and
reactivate them (never themselves) and reset a lost second factor."""

from __future__ import annotations

from flask import abort, flash, redirect, render_template, url_for
from flask_login import current_user

from partner_app.dashboard import queries
from partner_app.dashboard.blueprint import admin_required, bp
from partner_app.dashboard.forms import ConfirmForm, StaffCreateForm
from partner_app.db import db
from partner_app.security import staff


def _page(create_form: StaffCreateForm, status: int = 200):
    return render_template("dashboard/staff_accounts.html", members=queries.staff_members(),
                           create_form=create_form, form=ConfirmForm()), status


@bp.get("/accounts")
def staff_accounts():
    return _page(StaffCreateForm(formdata=None))


@bp.post("/accounts")
@admin_required
def staff_create():
    form = StaffCreateForm()
    if not form.validate_on_submit():
        return _page(form, 400)
    try:
        member = staff.create_staff(form.email.data, form.password.data, role=form.role.data,
                                    actor=current_user.email, by_staff_id=current_user.id)
    except staff.StaffError as exc:
        form.email.errors.append(str(exc))
        return _page(form, 400)
    db.session.commit()
    flash(f"Added {member.email} as {member.role}. Share the initial password with them "
          "in person or by another channel.", "info")
    return redirect(url_for("dashboard.staff_accounts"))


def _member_action(staff_id: int, change, done: str):
    if not ConfirmForm().validate_on_submit():
        flash("The form expired; please try again.", "error")
        return redirect(url_for("dashboard.staff_accounts"))
    member = queries.staff_member(staff_id)
    if member is None:
        abort(404)
    try:
        change(member)
    except staff.StaffError as exc:
        flash(str(exc).capitalize() + ".", "error")
        return redirect(url_for("dashboard.staff_accounts"))
    db.session.commit()
    flash(done.format(email=member.email), "info")
    return redirect(url_for("dashboard.staff_accounts"))


@bp.post("/accounts/<int:staff_id>/deactivate")
@admin_required
def staff_deactivate(staff_id: int):
    return _member_action(staff_id, lambda m: staff.set_active(m, False, actor=current_user),
                          "{email} can no longer sign in.")


@bp.post("/accounts/<int:staff_id>/reactivate")
@admin_required
def staff_reactivate(staff_id: int):
    return _member_action(staff_id, lambda m: staff.set_active(m, True, actor=current_user),
                          "{email} can sign in again.")


@bp.post("/accounts/<int:staff_id>/reset-totp")
@admin_required
def staff_reset_totp(staff_id: int):
    return _member_action(staff_id, lambda m: staff.reset_totp(m, actor=current_user),
                          "{email} signs in with a password alone until they enrol again.")
