"""The install flow: install links, the authorization request and the callback.

Services here take explicit collaborators (settings, vault, Stora OAuth client, clock)
and never read the Flask request; they ``flush`` and the view commits. Every way the
callback can fail has a named reason the operator sees and the audit log records.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from authlib.common.security import generate_token
from sqlalchemy import select, update

from partner_app import audit
from partner_app.connections.credentials import store_token_set
from partner_app.connections.models import (
    InstallLink,
    OAuthState,
    Operator,
    OperatorStatus,
)
from partner_app.db import db
from partner_app.queueing import STORA_RETRY, enqueue_after_commit
from partner_app.security.vault import PURPOSE_INSTALL_STATE, Vault
from partner_app.settings import Settings
from partner_app.stora.errors import OAuthError, OAuthUnavailable
from partner_app.stora.oauth import StoraOAuth, TokenInfo

log = logging.getLogger(__name__)

# Operator-facing explanations of every failure reason.
REASONS: dict[str, str] = {
    "access_denied": "The connection was declined in Stora. Nothing was changed.",
    "authorization_failed": "Stora could not start the authorization.",
    "state_invalid": "This sign-in response is not one we started. Please start again.",
    "state_used": "This sign-in response was already used. Please start again.",
    "state_expired": "The sign-in took too long and expired. Please start again.",
    "session_mismatch": "This sign-in was started in a different browser. "
                        "Please start again in this one.",
    "code_missing": "Stora did not return an authorization code.",
    "link_unknown": "This install link is not valid.",
    "link_expired": "This install link has expired. Ask for a new one.",
    "link_used": "This install link was already used. Ask for a new one.",
    "exchange_failed": "Stora did not accept the authorization. Please start again.",
    "stora_unavailable": "Stora did not answer in time. Please start again in a minute.",
    "operator_unknown": "Stora did not tell us which operator approved the connection.",
    "operator_mismatch": "The operator approved in Stora is not the one this link was "
                         "issued for.",
}


class InstallFailed(Exception):
    """The install cannot proceed; ``reason`` is a key of REASONS."""

    def __init__(self, reason: str, *, detail: str | None = None):
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- install links ----------------------------------------------------------------------
@dataclass(frozen=True)
class IssuedLink:
    link: InstallLink
    url: str


def create_install_link(*, settings: Settings, created_by: str, now: datetime,
                        operator: Operator | None = None, ttl: timedelta | None = None,
                        note: str | None = None) -> IssuedLink:
    """Issue a single-use link; the URL (holding the only copy of its secret) is returned once."""
    secret = secrets.token_urlsafe(32)
    link = InstallLink(
        token_hash=_digest(secret),
        operator_id=operator.id if operator else None,
        created_by=created_by,
        note=note,
        expires_at=now + (ttl or timedelta(seconds=settings.install_link_ttl)),
    )
    db.session.add(link)
    db.session.flush()
    audit.record("install_link.created", actor_type="staff", actor=created_by,
                 operator_id=link.operator_id, link_id=link.id,
                 expires_at=link.expires_at.isoformat())
    return IssuedLink(link=link, url=f"{settings.public_base_url}/install/{secret}")


def _check_link(link: InstallLink | None, now: datetime) -> InstallLink:
    if link is None:
        raise InstallFailed("link_unknown")
    if link.used_at is not None:
        raise InstallFailed("link_used")
    if link.expires_at <= now:
        raise InstallFailed("link_expired")
    return link


def find_install_link(secret: str, *, now: datetime) -> InstallLink:
    """The usable link for a URL secret. Raises InstallFailed(link_*)."""
    if not secret or len(secret) > 200:
        raise InstallFailed("link_unknown")
    link = db.session.scalars(
        select(InstallLink).where(InstallLink.token_hash == _digest(secret))).one_or_none()
    return _check_link(link, now)


# -- authorization request ----------------------------------------------------------------
@dataclass(frozen=True)
class AuthorizationStart:
    authorize_url: str
    browser_nonce: str  # goes into the binding cookie; only its hash is stored


def begin_install(*, settings: Settings, vault: Vault, oauth: StoraOAuth, now: datetime,
                  link: InstallLink | None = None) -> AuthorizationStart:
    """Create the server-side state record and the Stora authorize URL (PKCE S256)."""
    state = secrets.token_urlsafe(32)
    browser_nonce = secrets.token_urlsafe(32)
    verifier = generate_token(48)
    state_hash = _digest(state)
    db.session.add(OAuthState(
        state_hash=state_hash,
        browser_hash=_digest(browser_nonce),
        code_verifier_ct=vault.seal(verifier, purpose=PURPOSE_INSTALL_STATE,
                                    context=f"oauth_states:{state_hash}"),
        install_link_id=link.id if link else None,
        redirect_uri=settings.redirect_uri,
        issuer=settings.stora_api_base,
        expires_at=now + timedelta(seconds=settings.install_state_ttl),
    ))
    db.session.flush()
    return AuthorizationStart(
        authorize_url=oauth.authorization_url(state=state, code_verifier=verifier),
        browser_nonce=browser_nonce)


# -- callback -----------------------------------------------------------------------------
@dataclass(frozen=True)
class InstallResult:
    operator: Operator
    reconnected: bool


def _consume_state(state: str | None, browser_nonce: str | None, now: datetime) -> OAuthState:
    """Atomically mark the state record used. Any second use fails, whatever the outcome."""
    if not state or len(state) > 200:
        raise InstallFailed("state_invalid")
    row = db.session.scalars(
        select(OAuthState).where(OAuthState.state_hash == _digest(state))).one_or_none()
    if row is None:
        raise InstallFailed("state_invalid")
    consumed = db.session.execute(
        update(OAuthState)
        .where(OAuthState.id == row.id, OAuthState.consumed_at.is_(None))
        .values(consumed_at=now)
        .execution_options(synchronize_session=False))
    if consumed.rowcount != 1:
        raise InstallFailed("state_used")
    db.session.refresh(row)
    if row.expires_at <= now:
        raise InstallFailed("state_expired")
    if not browser_nonce or not secrets.compare_digest(_digest(browser_nonce), row.browser_hash):
        raise InstallFailed("session_mismatch")
    return row


def _resolve_operator(info: TokenInfo, link: InstallLink | None) -> tuple[Operator, bool]:
    """The tenant for this Stora operator: the link's, a known one, or a new one."""
    known = db.session.scalars(
        select(Operator).where(Operator.stora_identity == info.identity)).one_or_none()
    if link is not None and link.operator is not None:
        target = link.operator
        if target.stora_identity not in (None, info.identity) or \
                (known is not None and known.id != target.id):
            raise InstallFailed("operator_mismatch")
        return target, target.connected_at is not None
    if known is not None:
        return known, True
    operator = Operator(stora_identity=info.identity, status=OperatorStatus.PENDING)
    db.session.add(operator)
    db.session.flush()
    return operator, False


def complete_install(*, settings: Settings, vault: Vault, oauth: StoraOAuth, now: datetime,
                     state: str | None, browser_nonce: str | None, code: str | None,
                     error: str | None) -> InstallResult:
    """Finish an authorization: verify state, exchange the code, identify the operator,
    store the tokens encrypted and queue the first API call.

    The state record is consumed first and stays consumed even when a later step fails
    (the caller commits in both cases). Raises InstallFailed with a named reason; on any
    failure an operator's existing credentials are untouched.
    """
    row = _consume_state(state, browser_nonce, now)
    if error:
        raise InstallFailed("access_denied" if error == "access_denied"
                            else "authorization_failed", detail=error[:80])
    if not code:
        raise InstallFailed("code_missing")
    link = _check_link(row.install_link, now) if row.install_link_id else None
    verifier = vault.unseal(row.code_verifier_ct, purpose=PURPOSE_INSTALL_STATE,
                            context=f"oauth_states:{row.state_hash}")
    try:
        tokens = oauth.exchange_code(code=code, code_verifier=verifier)
    except OAuthUnavailable as exc:
        # The outcome is unknown and a code is single-use: never retried, start again.
        raise InstallFailed("stora_unavailable", detail=str(exc)) from exc
    except OAuthError as exc:
        raise InstallFailed("exchange_failed", detail=exc.code or str(exc.status)) from exc
    try:
        info = oauth.token_info(tokens.access_token)
    except OAuthUnavailable as exc:
        raise InstallFailed("stora_unavailable", detail=str(exc)) from exc
    except OAuthError as exc:
        raise InstallFailed("operator_unknown", detail=exc.code) from exc

    operator, reconnected = _resolve_operator(info, link)
    operator.stora_identity = info.identity
    operator.name = info.operator_name
    operator.scopes = " ".join(info.scopes) or tokens.scope
    operator.status = OperatorStatus.ACTIVE
    operator.connected_at = now
    operator.disconnected_at = None
    operator.last_error = None
    credential = store_token_set(operator, tokens, vault=vault, now=now)
    if link is not None:
        link.used_at = now
    requested = set(settings.stora_scopes)
    granted = set(operator.scopes.split())
    audit.record("operator.reconnected" if reconnected else "operator.connected",
                 actor_type="operator", actor=info.operator_name, operator_id=operator.id,
                 via="install_link" if link else "public_link",
                 link_id=link.id if link else None,
                 scopes_missing=sorted(requested - granted),
                 token_info_operator_fields=list(info.raw_operator_keys))
    enqueue_after_commit("partner_app.connections.jobs.first_api_call", operator.id,
                         job_id=f"first-api-call-{operator.id}-{credential.version}",
                         retry=STORA_RETRY)
    _queue_webhook_reconcile(operator.id, credential.version)
    log.info("install.completed", extra={"operator": operator.public_id,
                                         "reconnected": reconnected})
    return InstallResult(operator=operator, reconnected=reconnected)


def _queue_webhook_reconcile(operator_id: int, credential_version: int) -> None:
    """Subscribe the operator to webhooks once the connect commits (imported here: the
    webhooks package builds on connections)."""
    from partner_app.webhooks.reconcile_jobs import connect_job_id, enqueue_reconcile_after_commit

    enqueue_reconcile_after_commit(operator_id,
                                   job_id=connect_job_id(operator_id, credential_version))


def record_failure(reason: str, *, detail: str | None) -> None:
    """Audit a failed install attempt (no operator is known yet)."""
    audit.record("install.failed", actor_type="operator", actor="unknown",
                 reason=reason, detail=detail)
