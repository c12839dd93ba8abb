"""Per-operator data keys and staff accounts."""

from __future__ import annotations

from datetime import datetime

from flask_login import UserMixin
from sqlalchemy import Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from partner_app.db import db, utcnow


class DataKey(db.Model):
    """An operator's data key, wrapped (encrypted) by a keyring key.

    Destroying it (``wrapped_key`` wiped, ``destroyed_at`` set) makes every secret the
    operator had unrecoverable: crypto-shredding. ``version`` fences re-wraps.
    """

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"),
                                             index=True)
    wrapping_kid: Mapped[str] = mapped_column(String(32), index=True)
    wrapped_key: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    destroyed_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<DataKey {self.id} operator={self.operator_id} kid={self.wrapping_kid}>"


class StaffUser(UserMixin, db.Model):
    """A member of the partner's staff who may use the dashboard."""

    __tablename__ = "staff_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    #: ``admin`` may run actions; ``viewer`` may only look.
    role: Mapped[str] = mapped_column(String(16), default="viewer", server_default="admin")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]
    #: The TOTP secret, sealed by the vault (purpose ``staff-totp``, bound to the id);
    #: set while enrolling, in force once ``totp_enabled_at`` is set.
    totp_secret_ct: Mapped[str | None] = mapped_column(Text)
    totp_enabled_at: Mapped[datetime | None]
    #: The time step of the last accepted code: a code is never accepted twice, nor an
    #: older one after a newer.
    totp_last_step: Mapped[int | None] = mapped_column(Integer)

    @property
    def totp_enabled(self) -> bool:
        return self.totp_enabled_at is not None and self.totp_secret_ct is not None

    @property
    def is_active(self) -> bool:  # Flask-Login
        return self.active

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def __repr__(self) -> str:
        return f"<StaffUser {self.email}>"
