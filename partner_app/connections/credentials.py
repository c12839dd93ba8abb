"""An operator's Stora tokens at rest: stored encrypted, read, decrypted.

Every write to ``credentials`` is a compare-and-swap on ``version`` (the fence), so a
stale writer (a slow refresher, a key rotation) changes nothing. The refresh protocol
that uses this lives in ``connections/tokens.py``.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select, update

from partner_app.connections.models import Credential, Operator
from partner_app.db import db
from partner_app.security.models import DataKey
from partner_app.security.vault import OperatorCipher, Vault
from partner_app.stora.oauth import TokenSet

log = logging.getLogger(__name__)

TABLE = "credentials"


class CredentialError(Exception):
    """Base class for "no usable token for this operator"."""


class NotConnected(CredentialError):
    """The operator has no stored credentials or is disconnected."""


class NeedsReauth(CredentialError):
    """The grant is gone (invalid_grant after a re-read); only a reconnect fixes it."""


class StaleCredential(CredentialError):
    """A fenced write found a newer version: someone else wrote first."""


def live_data_key(operator: Operator, *, vault: Vault) -> DataKey:
    """The operator's current data key, created on first need."""
    key = db.session.scalars(
        select(DataKey)
        .where(DataKey.operator_id == operator.id, DataKey.destroyed_at.is_(None))
        .order_by(DataKey.id.desc())
        .limit(1)).first()
    if key is None:
        wrapped = vault.new_data_key(operator.id)
        key = DataKey(operator_id=operator.id, wrapped_key=wrapped.wrapped_key,
                      wrapping_kid=wrapped.wrapping_kid)
        db.session.add(key)
        db.session.flush()
    return key


def cipher_for_key(key: DataKey, *, vault: Vault) -> OperatorCipher:
    return vault.cipher_for(operator_id=key.operator_id, data_key_id=key.id,
                            wrapped_key=key.wrapped_key)


def store_token_set(operator: Operator, tokens: TokenSet, *, vault: Vault, now: datetime,
                    expected_version: int | None = None) -> Credential:
    """Encrypt and store a token pair for the operator (flush only; the caller commits).

    Replaces an existing pair with a fenced write against ``expected_version`` (default:
    the version just read). Raises StaleCredential when the fence trips.
    """
    key = live_data_key(operator, vault=vault)
    cipher = cipher_for_key(key, vault=vault)
    values = {
        "data_key_id": key.id,
        "access_token_ct": cipher.encrypt(TABLE, "access_token_ct", tokens.access_token),
        "refresh_token_ct": (cipher.encrypt(TABLE, "refresh_token_ct", tokens.refresh_token)
                             if tokens.refresh_token else None),
        "access_expires_at": tokens.expires_at,
        "token_created_at": tokens.created_at,
        "scope": tokens.scope,
        "refreshed_at": now,
    }
    credential = db.session.scalars(
        select(Credential).where(Credential.operator_id == operator.id)).one_or_none()
    if credential is None:
        credential = Credential(operator_id=operator.id, version=1, **values)
        db.session.add(credential)
        db.session.flush()
    else:
        version = credential.version if expected_version is None else expected_version
        result = db.session.execute(
            update(Credential)
            .where(Credential.id == credential.id, Credential.version == version)
            .values(version=Credential.version + 1, **values)
            .execution_options(synchronize_session=False))
        if result.rowcount != 1:
            raise StaleCredential(f"credential of operator {operator.id} moved past v{version}")
        db.session.refresh(credential)
    # A key rotation may have destroyed the key we encrypted with between our choosing
    # it and our write; checked after the write, inside our transaction, so rotation's
    # "nothing references this key" check and ours cannot both pass.
    if db.session.scalar(select(DataKey.destroyed_at).where(DataKey.id == key.id)) is not None:
        raise StaleCredential(f"data key of operator {operator.id} was rotated away")
    return credential


def read_credential(operator_id: int, *, lock: bool = False) -> Credential:
    """The operator's credential row, freshly loaded.

    ``lock`` takes the row lock without waiting (``FOR UPDATE NOWAIT``; PostgreSQL
    raises lock_not_available when a sibling holds it; SQLite ignores it).
    """
    stmt = select(Credential).where(Credential.operator_id == operator_id)
    if lock:
        stmt = stmt.with_for_update(nowait=True)
    credential = db.session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()
    if credential is None:
        raise NotConnected(f"operator {operator_id} has no credentials")
    return credential


def decrypt_column(credential: Credential, column: str, *, vault: Vault) -> str:
    """Plaintext of one secret column; keep it in a local variable only."""
    key = db.session.get(DataKey, credential.data_key_id, populate_existing=True)
    if key is None:
        raise NotConnected("data key missing")
    return cipher_for_key(key, vault=vault).decrypt(TABLE, column,
                                                    getattr(credential, column))


