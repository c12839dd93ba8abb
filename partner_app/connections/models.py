"""Operators (our tenants), their encrypted Stora credentials, install links and OAuth states.

Secret columns end in ``_ct`` and only ever hold vault ciphertext (``v1.<kid>.<b64>``).
No ``__repr__`` here prints them.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from partner_app.db import db, utcnow


class OperatorStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DEGRADED = "degraded"  # transient errors; still refreshing and calling
    NEEDS_REAUTH = "needs_reauth"  # the grant is gone; only the operator can fix it
    DISCONNECTED = "disconnected"


def new_public_id() -> str:
    return "op_" + secrets.token_hex(8)


class Operator(db.Model):
    """A self-storage operator that connected (or is connecting) to the partner."""

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    status: Mapped[str] = mapped_column(String(20), default=OperatorStatus.PENDING, index=True)
    # How Stora identifies the operator: "id:<id>" when token info carries an id,
    # else "name:<name>" (the only documented field). Unique: one tenant per operator.
    stora_identity: Mapped[str | None] = mapped_column(String(300), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    storefront_host: Mapped[str | None] = mapped_column(String(255))
    scopes: Mapped[str] = mapped_column(Text, default="")
    connected_at: Mapped[datetime | None]
    disconnected_at: Mapped[datetime | None]
    last_api_success_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    # Consecutive transient refresh failures; reset by a successful refresh.
    refresh_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_refresh_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    credential: Mapped[Credential | None] = relationship(back_populates="operator",
                                                         uselist=False)

    def __repr__(self) -> str:
        return f"<Operator {self.public_id} {self.status} {self.name!r}>"


class Credential(db.Model):
    """An operator's current token pair, encrypted with the operator's data key.

    ``version`` is the fence: every write is ``UPDATE … WHERE version = :read_version``
    and bumps it, so a stale writer (a slow refresher, a key rotation) changes nothing.
    """

    __tablename__ = "credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"),
                                             unique=True)
    data_key_id: Mapped[int] = mapped_column(ForeignKey("data_keys.id"))
    access_token_ct: Mapped[str] = mapped_column(Text)
    refresh_token_ct: Mapped[str | None] = mapped_column(Text)
    access_expires_at: Mapped[datetime]
    token_created_at: Mapped[datetime | None]
    scope: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    refreshed_at: Mapped[datetime] = mapped_column(default=utcnow)

    operator: Mapped[Operator] = relationship(back_populates="credential")

    def __repr__(self) -> str:
        return f"<Credential operator={self.operator_id} v{self.version}>"


class InstallLink(db.Model):
    """A staff-issued, single-use, expiring install link.

    Only the SHA-256 of the link's secret is stored; the URL itself is shown once.
    """

    __tablename__ = "install_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    operator_id: Mapped[int | None] = mapped_column(ForeignKey("operators.id",
                                                               ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]

    operator: Mapped[Operator | None] = relationship()


class OAuthState(db.Model):
    """One authorization attempt: the server side of ``state``.

    ``state`` and the browser-binding cookie are stored as SHA-256 hashes; the PKCE
    verifier is encrypted. A row is consumed at most once (``consumed_at``).
    """

    __tablename__ = "oauth_states"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    browser_hash: Mapped[str] = mapped_column(String(64))
    code_verifier_ct: Mapped[str] = mapped_column(Text)
    install_link_id: Mapped[int | None] = mapped_column(ForeignKey("install_links.id",
                                                                   ondelete="CASCADE"))
    redirect_uri: Mapped[str] = mapped_column(String(500))
    issuer: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    consumed_at: Mapped[datetime | None]

    install_link: Mapped[InstallLink | None] = relationship()
