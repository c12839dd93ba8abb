"""Install link, OAuth callback and result pages. Thin: parse, call a service, commit."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import (
    Blueprint,
    Response,
    current_app,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from partner_app.connections import install
from partner_app.connections.models import Operator
from partner_app.db import db

bp = Blueprint("connections", __name__)

BINDING_COOKIE = "stora_install"
_RESULT_KEY = "install_result"


def _services():
    ext = current_app.extensions
    return {"settings": ext["settings"], "vault": ext["vault"], "oauth": ext["stora_oauth"]}


def _no_leak(response: Response) -> Response:
    """The callback URL carries code and state: never cache it, never refer it onwards."""
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def _start(link=None) -> Response:
    settings = current_app.extensions["settings"]
    start = install.begin_install(now=datetime.now(UTC), link=link, **_services())
    db.session.commit()
    response = redirect(start.authorize_url, code=302)
    # Binds the state to this browser. Lax: the callback is a cross-site top-level GET.
    response.set_cookie(BINDING_COOKIE, start.browser_nonce, max_age=settings.install_state_ttl,
                        path="/oauth", httponly=True, samesite="Lax",
                        secure=settings.secure_cookies)
    return _no_leak(response)


def _failure_page(reason: str, status: int = 400) -> Response:
    response = make_response(render_template(
        "connections/failure.html", reason=reason, message=install.REASONS[reason]), status)
    return _no_leak(response)


@bp.get("/install")
def public_install() -> Response:
    """The public install link: any operator may connect."""
    return _start()


@bp.get("/install/<secret>")
def link_install(secret: str) -> Response:
    """A staff-issued link: single-use, expiring, possibly bound to a known operator."""
    try:
        link = install.find_install_link(secret, now=datetime.now(UTC))
    except install.InstallFailed as failure:
        return _failure_page(failure.reason, status=410 if failure.reason != "link_unknown"
                             else 404)
    return _start(link)


@bp.get("/oauth/callback")
def callback() -> Response:
    """Stora sends the browser back here with ``code`` and ``state`` (or ``error``)."""
    try:
        result = install.complete_install(
            now=datetime.now(UTC),
            state=request.args.get("state"),
            browser_nonce=request.cookies.get(BINDING_COOKIE),
            code=request.args.get("code"),
            error=request.args.get("error"),
            **_services())
    except install.InstallFailed as failure:
        install.record_failure(failure.reason, detail=failure.detail)
        db.session.commit()  # keeps the state consumed and the failure audited
        session[_RESULT_KEY] = {"ok": False, "reason": failure.reason}
    else:
        db.session.commit()
        session[_RESULT_KEY] = {"ok": True, "operator": result.operator.public_id,
                                "reconnected": result.reconnected}
    # Leave the URL that holds the code at once (RFC 9700 §4.2.4).
    response = redirect(url_for("connections.result"), code=303)
    response.delete_cookie(BINDING_COOKIE, path="/oauth")
    return _no_leak(response)


@bp.get("/install/result")
def result() -> Response:
    outcome = session.get(_RESULT_KEY)
    if outcome is None:
        return _failure_page("state_invalid")
    if not outcome.get("ok"):
        return _failure_page(outcome["reason"])
    operator = db.session.query(Operator).filter_by(public_id=outcome["operator"]).one_or_none()
    if operator is None:
        return _failure_page("state_invalid")
    return _no_leak(make_response(render_template(
        "connections/success.html", operator=operator,
        reconnected=outcome.get("reconnected", False))))
