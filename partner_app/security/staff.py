"""Staff accounts: argon2id password hashes and the Flask-Login user loader."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import Flask
from sqlalchemy import func, select

from partner_app import audit
from partner_app.db import db
from partner_app.extensions import login_manager
from partner_app.security.models import StaffUser

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified when the e-mail is unknown, so both paths take the same time. Made on
    first sign-in, not at import: argon2 takes 64 MiB, which every worker would keep."""
    return _hasher.hash("not-a-real-password")


class StaffError(Exception):
    pass


def normalise_email(email: str) -> str:
    return email.strip().lower()


ROLES = ("admin", "viewer")


def create_staff(email: str, password: str, *, role: str = "viewer", actor: str) -> StaffUser:
    """Add a staff account (flush only). Raises StaffError on bad input or a duplicate."""
    if role not in ROLES:
        raise StaffError(f"role must be one of {', '.join(ROLES)}")
    email = normalise_email(email)
    if "@" not in email or len(email) > 254:
        raise StaffError("a valid e-mail address is required")
    if len(password) < 12:
        raise StaffError("the password must be at least 12 characters")
    if db.session.scalar(select(func.count()).where(StaffUser.email == email)):
        raise StaffError(f"{email} already has an account")
    user = StaffUser(email=email, password_hash=_hasher.hash(password), role=role)
    db.session.add(user)
    db.session.flush()
    audit.record("staff.created", actor_type="staff" if actor != "cli" else "system",
                 actor=actor, staff_id=user.id, email=email, role=role)
    return user


def authenticate(email: str, password: str) -> StaffUser | None:
    """The active staff user with these credentials, or None (constant-ish time)."""
    user = db.session.scalars(
        select(StaffUser).where(StaffUser.email == normalise_email(email))).one_or_none()
    try:
        _hasher.verify(user.password_hash if user else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.last_login_at = datetime.now(UTC)
    return user


def init_app(app: Flask) -> None:
    @login_manager.user_loader
    def load_user(user_id: str) -> StaffUser | None:
        try:
            return db.session.get(StaffUser, int(user_id))
        except ValueError:
            return None
