"""The staff dashboard blueprint and its one guard.

Every route under ``/staff`` requires a signed-in, active staff member, except the
sign-in page itself (``PUBLIC_ENDPOINTS``). State-changing routes are POSTs, carry a CSRF
token (Flask-WTF's ``CSRFProtect`` covers the whole app) and, where they change an
operator or the platform, require the ``admin`` role: :func:`admin_required`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TypeVar

from flask import Blueprint, abort, current_app, flash, redirect, request, session, url_for
from flask_login import current_user, logout_user

from partner_app.security.staff import session_expired

bp = Blueprint("dashboard", __name__, url_prefix="/staff")

PUBLIC_ENDPOINTS = frozenset({"dashboard.login", "dashboard.login_code"})

#: The header's navigation, in order; a page appears once its endpoint is registered.
NAV = (
    ("dashboard.index", "Overview"),
    ("dashboard.operators", "Operators"),
    ("dashboard.events", "Events"),
    ("dashboard.jobs", "Jobs"),
    ("dashboard.audit_log", "Audit log"),
    ("dashboard.staff_accounts", "Staff"),
)

F = TypeVar("F", bound=Callable)


@bp.before_request
def require_staff():
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if not current_user.is_authenticated:
        return current_app.login_manager.unauthorized()
    settings = current_app.extensions["settings"]
    if session_expired(session, now=time.time(), idle=settings.staff_session_idle,
                       absolute=settings.staff_session_max):
        logout_user()
        session.clear()
        flash("Your session expired; please sign in again.", "info")
        return redirect(url_for("dashboard.login",
                                next=request.path if request.method == "GET" else None))
    return None


@bp.app_context_processor
def navigation() -> dict:
    return {"nav_items": [(e, label) for e, label in NAV if e in current_app.view_functions]}


def admin_required(view: F) -> F:
    """Only staff with the ``admin`` role may run this view; viewers get 403."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not getattr(current_user, "is_admin", False):
            abort(403)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
