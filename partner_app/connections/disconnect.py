"""Disconnecting an operator: revoke at Stora, crypto-shred, mark, audit. Idempotent.

Order matters. Stora is told first, while we can still decrypt the token: the
operator's webhook endpoints are disabled, then the grant is revoked. If Stora is
unreachable nothing local changes and the caller retries later (or forces a local-only
disconnect). Only then is the operator's data key destroyed, which makes every secret
it protected unrecoverable (tokens and webhook secrets), and the credential row removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update

from partner_app import audit, incidents
from partner_app.connections.credentials import CredentialError, decrypt_column
from partner_app.connections.models import Credential, Operator, OperatorStatus
from partner_app.connections.tokens import PlatformCredentialsRejected
from partner_app.db import db
from partner_app.security.models import DataKey
from partner_app.security.vault import Vault, VaultError
from partner_app.stora.errors import (
    InvalidClient,
    OAuthRequestRejected,
    OAuthUnavailable,
    RateLimited,
    RateLimitWait,
    StoraError,
)
from partner_app.stora.oauth import StoraOAuth
from partner_app.webhooks.subscriptions import close_locally as close_subscriptions
from partner_app.webhooks.subscriptions import disable_endpoints_at_stora

log = logging.getLogger(__name__)


class DisconnectFailed(Exception):
    """Nothing was changed; ``reason`` says why (e.g. ``stora_unavailable``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DisconnectResult:
    operator: Operator
    already_disconnected: bool
    revoked_at_stora: bool
    destroyed_keys: int


def _revoke(credential: Credential, *, vault: Vault, oauth: StoraOAuth) -> bool:
    """Revoke the stored grant at Stora (RFC 7009). True if Stora confirmed."""
    try:
        column = "refresh_token_ct" if credential.refresh_token_ct else "access_token_ct"
        token = decrypt_column(credential, column, vault=vault)
    except VaultError:
        return False  # already shredded: nothing left to revoke
    hint = "refresh_token" if column == "refresh_token_ct" else "access_token"
    try:
        # Doorkeeper revokes the whole row: the access token dies with the refresh token.
        oauth.revoke(token, token_type_hint=hint)
    except OAuthUnavailable as exc:
        raise DisconnectFailed("stora_unavailable") from exc
    except InvalidClient as exc:
        incidents.report(incidents.INVALID_CLIENT, endpoint="revoke")
        raise DisconnectFailed("invalid_client") from exc
    except OAuthRequestRejected as exc:
        # Doorkeeper answers 403 for a token of another application: not ours to revoke.
        log.warning("disconnect.revoke_rejected", extra={"status": exc.status})
        return False
    return True


def _disable_webhooks(operator_id: int) -> int:
    """Disable the operator's webhook endpoints at Stora; returns how many.

    Raises DisconnectFailed when Stora cannot be reached now. If a later step then fails,
    the operator stays connected with endpoints disabled at Stora, which the webhook
    reconciler repairs like any other drift. A grant that is already gone cannot be used
    to tell Stora, and is no reason to keep the operator connected.
    """
    try:
        return disable_endpoints_at_stora(operator_id)
    except PlatformCredentialsRejected as exc:
        raise DisconnectFailed("invalid_client") from exc
    except (RateLimited, RateLimitWait) as exc:
        raise DisconnectFailed("stora_rate_limited") from exc
    except (StoraError, CredentialError) as exc:
        if getattr(exc, "retryable", False):
            raise DisconnectFailed("stora_unavailable") from exc
        log.warning("disconnect.webhooks_not_disabled", extra={"error": type(exc).__name__})
        return 0


def disconnect_operator(operator: Operator, *, vault: Vault, oauth: StoraOAuth, now: datetime,
                        actor_type: str, actor: str, revoke: bool = True) -> DisconnectResult:
    """Disconnect (flush only; the caller commits). Safe to call again.

    Raises DisconnectFailed when Stora could not be told and ``revoke`` is True.
    """
    if operator.status == OperatorStatus.DISCONNECTED:
        return DisconnectResult(operator, True, False, 0)
    credential = db.session.scalars(
        select(Credential).where(Credential.operator_id == operator.id)).one_or_none()
    webhooks_disabled = _disable_webhooks(operator.id) if (revoke and credential) else 0
    revoked = _revoke(credential, vault=vault, oauth=oauth) if (revoke and credential) \
        else False
    destroyed = db.session.execute(
        update(DataKey)
        .where(DataKey.operator_id == operator.id, DataKey.destroyed_at.is_(None))
        .values(wrapped_key=None, destroyed_at=now)
        .execution_options(synchronize_session=False)).rowcount
    db.session.execute(delete(Credential).where(Credential.operator_id == operator.id))
    close_subscriptions(operator.id, reason="operator disconnected")
    operator.status = OperatorStatus.DISCONNECTED
    operator.disconnected_at = now
    operator.last_error = None
    audit.record("operator.disconnected", actor_type=actor_type, actor=actor,
                 operator_id=operator.id, revoked_at_stora=revoked, destroyed_keys=destroyed,
                 revoke_requested=revoke, webhook_endpoints_disabled=webhooks_disabled)
    db.session.flush()
    log.info("operator.disconnected", extra={"operator": operator.public_id,
                                             "revoked": revoked})
    return DisconnectResult(operator, False, revoked, destroyed)
