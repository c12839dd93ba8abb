"""Staff accounts and signed-in test clients for dashboard tests (real forms, real CSRF)."""

from __future__ import annotations

import re

from partner_app.db import db
from partner_app.security.staff import create_staff

PASSWORD = "a-long-staff-password"
_CSRF_RE = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"'
                      r'|value="([^"]+)"[^>]*name="csrf_token"')


def make_staff(app, email: str, role: str = "admin") -> int:
    """Create an account and return its id (its own app context; committed)."""
    with app.app_context():
        user = create_staff(email, PASSWORD, role=role, actor="cli")
        db.session.commit()
        user_id = user.id
        db.session.remove()
    return user_id


def csrf_token(client, path: str = "/staff/login") -> str:
    """The session's CSRF token, read from a page's form as a browser would."""
    html = client.get(path).get_data(as_text=True)
    match = _CSRF_RE.search(html)
    assert match, f"no CSRF token on {path}"
    return match.group(1) or match.group(2)


def sign_in(client, email: str, password: str = PASSWORD, **extra):
    token = csrf_token(client)
    return client.post("/staff/login", data={"csrf_token": token, "email": email,
                                             "password": password, **extra})


def post(client, path: str, data: dict | None = None, *, page: str = "/staff/account"):
    """POST with the signed-in session's CSRF token."""
    return client.post(path, data={"csrf_token": csrf_token(client, page), **(data or {})})
