"""An operator's Stora tokens: storing them encrypted, reading them, refreshing them.

Every write to ``credentials`` is a compare-and-swap on ``version`` (the fence), so a
stale writer changes nothing. A refresh takes the credential's row lock on PostgreSQL
(``SELECT … FOR UPDATE``) across the token call so only one process spends a refresh
token; SQLite has no row locks, and there the fence alone keeps the stored pair right.
New tokens are committed before anyone uses the new access token, because Stora
(Doorkeeper) revokes the previous refresh token on the new access token's first use.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from partner_app import audit
from partner_app.connections.models import Credential, Operator, OperatorStatus
from partner_app.db import db
from partner_app.security.models import DataKey
from partner_app.security.vault import OperatorCipher, Vault
from partner_app.stora.errors import InvalidGrant, OAuthError
from partner_app.stora.oauth import StoraOAuth, TokenSet

log = logging.getLogger(__name__)

TABLE = "credentials"
# Refresh on demand when less than this remains, so a token never expires mid-call.
ON_DEMAND_MARGIN = timedelta(seconds=120)


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


def _read(operator_id: int, *, lock: bool = False) -> Credential:
    stmt = select(Credential).where(Credential.operator_id == operator_id)
    if lock:
        stmt = stmt.with_for_update()
    credential = db.session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()
    if credential is None:
        raise NotConnected(f"operator {operator_id} has no credentials")
    return credential


def _decrypt(credential: Credential, column: str, *, vault: Vault) -> str:
    key = db.session.get(DataKey, credential.data_key_id)
    if key is None:
        raise NotConnected("data key missing")
    return cipher_for_key(key, vault=vault).decrypt(TABLE, column,
                                                    getattr(credential, column))


def _usable(credential: Credential, *, vault: Vault, now: datetime,
            rejected: str | None) -> str | None:
    """The stored access token if it is fresh and not the one Stora just rejected."""
    if credential.access_expires_at - now <= ON_DEMAND_MARGIN:
        return None
    token = _decrypt(credential, "access_token_ct", vault=vault)
    return None if rejected is not None and secrets.compare_digest(token, rejected) else token


def get_access_token(operator_id: int, *, vault: Vault, oauth: StoraOAuth,
                     now: Callable[[], datetime] = lambda: datetime.now(UTC),
                     rejected: str | None = None) -> str:
    """A valid access token for the operator, refreshing it single-flight if needed.

    ``rejected`` is a token Stora answered 401 to: it is never returned, so a caller
    either gets a sibling's newer token or a fresh refresh. Commits its own transaction
    when it refreshes (the new pair must be durable before its first use), so call it
    outside any unit of work you still want to roll back. Raises NotConnected,
    NeedsReauth, or a retryable OAuthError.
    """
    operator = db.session.get(Operator, operator_id)
    if operator is None or operator.status in (OperatorStatus.DISCONNECTED,
                                               OperatorStatus.PENDING):
        raise NotConnected(f"operator {operator_id} is not connected")
    if operator.status == OperatorStatus.NEEDS_REAUTH:
        raise NeedsReauth(f"operator {operator_id} needs to reconnect")
    token = _usable(_read(operator_id), vault=vault, now=now(), rejected=rejected)
    if token is not None:
        return token
    db.session.commit()  # end the read; the locked read below starts a fresh transaction

    locked = _read(operator_id, lock=True)
    token = _usable(locked, vault=vault, now=now(), rejected=rejected)
    if token is not None:  # a sibling refreshed while we waited for the lock
        db.session.commit()
        return token
    if locked.refresh_token_ct is None:
        _mark_needs_reauth(operator_id, reason="no refresh token stored")
        raise NeedsReauth(f"operator {operator_id} has no refresh token")
    spent = _decrypt(locked, "refresh_token_ct", vault=vault)
    read_version = locked.version
    try:
        tokens = oauth.refresh(spent)
    except InvalidGrant:
        db.session.rollback()
        current = _read(operator_id)
        if current.refresh_token_ct is not None and not secrets.compare_digest(
                _decrypt(current, "refresh_token_ct", vault=vault), spent):
            # A sibling rotated the pair under us: adopt its result, never declare death.
            token = _decrypt(current, "access_token_ct", vault=vault)
            db.session.commit()
            return token
        _mark_needs_reauth(operator_id, reason="refresh token rejected (invalid_grant)")
        raise NeedsReauth(f"operator {operator_id}: refresh token rejected") from None
    except OAuthError:
        db.session.rollback()
        raise
    operator = db.session.get(Operator, operator_id)
    credential = store_token_set(operator, tokens, vault=vault, now=now(),
                                 expected_version=read_version)
    log.info("token.refreshed", extra={"operator": operator.public_id,
                                       "version": credential.version})
    db.session.commit()
    return tokens.access_token


def _mark_needs_reauth(operator_id: int, *, reason: str) -> None:
    operator = db.session.get(Operator, operator_id)
    operator.status = OperatorStatus.NEEDS_REAUTH
    operator.last_error = reason
    audit.record("operator.needs_reauth", actor_type="system", actor="token-refresh",
                 operator_id=operator_id, reason=reason)
    db.session.commit()
    log.warning("token.needs_reauth", extra={"operator": operator.public_id, "reason": reason})


class OperatorTokens:
    """``TokenSource`` for ``StoraClient``: tokens from the vault, refreshed on demand."""

    def __init__(self, operator_id: int, *, vault: Vault, oauth: StoraOAuth):
        self.operator_id = operator_id
        self._vault = vault
        self._oauth = oauth

    def access_token(self) -> str:
        return get_access_token(self.operator_id, vault=self._vault, oauth=self._oauth)

    def replace_rejected(self, rejected: str) -> str | None:
        # A sibling may have rotated (and so revoked our token): get_access_token returns
        # the stored token if it is a different, fresh one, and refreshes otherwise.
        db.session.rollback()
        try:
            return get_access_token(self.operator_id, vault=self._vault, oauth=self._oauth,
                                    rejected=rejected)
        except NeedsReauth:
            return None
