"""The OAuth authorization server's rules, with Doorkeeper semantics and no HTTP.

Each function takes the store and already-parsed parameters, does its checks and state
changes atomically under ``store.lock``, and either returns the result or raises
:class:`OAuthError`. The HTTP layer (:mod:`stora_sandbox.oauth`) only translates.

Behaviour follows Doorkeeper (shared/design/reliability.md §2):

* authorization codes: single use; a replay fails with ``invalid_grant`` and revokes the
  token row the code produced (Doorkeeper main, #1865); PKCE S256/plain, and a verifier
  sent for a grant that had no challenge is rejected (downgrade defence);
* refresh in ``on_use`` mode: the old row survives and is revoked when the new access
  token first authenticates (:func:`authenticate_access_token`); in ``immediate`` mode
  the old row is revoked during the refresh;
* the new row copies the old row's ``expires_in`` and scopes (or a narrower requested
  set); refresh tokens never expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from stora_sandbox.config import STORA_SCOPES
from stora_sandbox.models import Application, Grant, TokenRow
from stora_sandbox.store import Store, canary_token, new_token

# Texts from Doorkeeper's config/locales/en.yml, so clients see realistic descriptions.
DESCRIPTIONS = {
    "invalid_request": (
        "The request is missing a required parameter, includes an unsupported parameter "
        "value, or is otherwise malformed."
    ),
    "invalid_client": (
        "Client authentication failed due to unknown client, no client authentication "
        "included, or unsupported authentication method."
    ),
    "invalid_grant": (
        "The provided authorization grant is invalid, expired, revoked, does not match the "
        "redirection URI used in the authorization request, or was issued to another client."
    ),
    "unsupported_grant_type": (
        "The authorization grant type is not supported by the authorization server."
    ),
    "invalid_scope": "The requested scope is invalid, unknown, or malformed.",
    "access_denied": "The resource owner or authorization server denied the request.",
    "unsupported_response_type": "The authorization server does not support this response type.",
    "unauthorized_client": "You are not authorized to revoke this token",
    "invalid_token": "The access token is invalid",
}


class OAuthError(Exception):
    """An RFC 6749 error response: ``error`` code, description and HTTP status.

    The description never contains a token, code or secret.
    """

    def __init__(self, error: str, description: str | None = None, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description or DESCRIPTIONS.get(error, error)
        self.status = status


def parse_scopes(raw: str | None) -> tuple[str, ...]:
    """Split a space-separated scope string, dropping duplicates but keeping order."""
    return tuple(dict.fromkeys((raw or "").split()))


def authenticate_client(store: Store, client_id: str | None, secret: str | None) -> Application:
    """Return the application whose credentials these are.

    Raises:
        OAuthError: ``invalid_client`` (401) for an unknown id or a wrong/missing secret.
    """
    application = store.get_application(client_id)
    if (
        application is None
        or not secret
        or not hmac.compare_digest(application.client_secret.encode(), secret.encode())
    ):
        raise OAuthError("invalid_client", status=401)
    return application


def check_requested_scopes(application: Application, requested: tuple[str, ...]) -> None:
    """Raise ``invalid_scope`` unless every scope is a Stora scope the app may request."""
    if not requested or not set(requested) <= (STORA_SCOPES & application.scopes):
        raise OAuthError("invalid_scope")


def s256_challenge(verifier: str) -> str:
    """BASE64URL(SHA256(verifier)) without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii", errors="replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def issue_code(
    store: Store,
    *,
    application: Application,
    operator_id: str,
    redirect_uri: str,
    scopes: tuple[str, ...],
    code_challenge: str | None,
    code_challenge_method: str | None,
) -> Grant:
    """Create an authorization code bound to everything the token request must repeat."""
    with store.lock:
        now = store.now()
        grant = Grant(
            code=canary_token("code", store.canary, new_token()),
            client_id=application.client_id,
            operator_id=operator_id,
            redirect_uri=redirect_uri,
            scopes=scopes,
            code_challenge=code_challenge or None,
            code_challenge_method=(code_challenge_method or None) if code_challenge else None,
            created_at=now,
            expires_at=now + store.switches.code_ttl,
        )
        store.add_grant(grant)
        return grant


def _verifier_matches(grant: Grant, verifier: str) -> bool:
    if grant.code_challenge is None:
        return False
    if grant.code_challenge_method == "S256":
        expected = s256_challenge(verifier)
    elif grant.code_challenge_method == "plain":
        expected = verifier
    else:
        return False
    return hmac.compare_digest(expected.encode(), grant.code_challenge.encode())


def exchange_code(
    store: Store,
    *,
    client_id: str | None,
    client_secret: str | None,
    code: str | None,
    redirect_uri: str | None,
    code_verifier: str | None,
) -> TokenRow:
    """The ``authorization_code`` grant. Returns the new token row.

    Check order is Doorkeeper's: required parameters (``invalid_request``), client
    (``invalid_client``), grant (``invalid_grant``), redirect URI, then PKCE.
    """
    with store.lock:
        grant = store.grants.get(code) if code else None
        if not code:
            raise OAuthError("invalid_request", "Missing required parameter: code.")
        if grant is not None and grant.code_challenge and not code_verifier:
            raise OAuthError("invalid_request", "Missing required parameter: code_verifier.")
        if not redirect_uri:
            raise OAuthError("invalid_request", "Missing required parameter: redirect_uri.")
        application = authenticate_client(store, client_id, client_secret)
        if grant is None:
            raise OAuthError("invalid_grant")
        if grant.revoked_at is not None:
            # Replay: the code was already exchanged. RFC 6749 §4.1.2 asks to revoke what
            # it produced; Doorkeeper main revokes that one row (not later refreshes).
            if grant.token_row_id is not None:
                store.revoke_row(store.token_rows[grant.token_row_id])
            raise OAuthError("invalid_grant")
        if grant.client_id != application.client_id or store.now() >= grant.expires_at:
            raise OAuthError("invalid_grant")
        if redirect_uri != grant.redirect_uri:
            raise OAuthError("invalid_grant")
        # A verifier sent for a grant without a challenge fails too (RFC 9700 §4.8.2).
        pkce_used = grant.code_challenge is not None or bool(code_verifier)
        if pkce_used and not (code_verifier and _verifier_matches(grant, code_verifier)):
            raise OAuthError("invalid_grant")
        grant.revoked_at = store.now()
        row = store.add_token_row(
            client_id=application.client_id,
            operator_id=grant.operator_id,
            scopes=grant.scopes,
            expires_in=store.switches.access_token_ttl,
        )
        grant.token_row_id = row.id
        return row


def refresh(
    store: Store,
    *,
    client_id: str | None,
    client_secret: str | None,
    refresh_token: str | None,
    scope: str | None,
) -> TokenRow:
    """The ``refresh_token`` grant. Returns the new token row.

    ``on_use`` mode: the old row stays valid and the new row points back at it, so
    retrying with the same refresh token succeeds until the new access token is used.
    ``immediate`` mode: the old row is revoked here, so a retry gets ``invalid_grant``.
    Under ``omit_refresh_token_on_refresh`` the new row takes over the presented refresh
    token instead of getting a fresh one.
    """
    with store.lock:
        switches = store.switches
        if not refresh_token:
            raise OAuthError("invalid_request", "Missing required parameter: refresh_token.")
        application = authenticate_client(store, client_id, client_secret)
        old = store.row_by_refresh_token(refresh_token)
        if old is None or old.is_revoked() or old.client_id != application.client_id:
            raise OAuthError("invalid_grant")
        scopes = old.scopes
        if scope:
            requested = parse_scopes(scope)
            if not set(requested) <= set(old.scopes):
                raise OAuthError("invalid_scope")
            scopes = requested
        immediate = switches.revocation_mode == "immediate"
        if immediate:
            store.revoke_row(old)
        new = store.add_token_row(
            client_id=old.client_id,
            operator_id=old.operator_id,
            scopes=scopes,
            expires_in=old.expires_in,
            with_refresh_token=not switches.omit_refresh_token_on_refresh,
            previous_row_id=None if immediate else old.id,
        )
        if switches.omit_refresh_token_on_refresh:
            store.move_refresh_token(old, new)
        return new


def authenticate_access_token(store: Store, access_token: str | None) -> TokenRow | None:
    """Resolve a bearer token for a protected request; this *is* a "use".

    Like Doorkeeper's ``OAuth::Token.authenticate``: any row found by the token value
    (even expired or revoked) revokes its previous row in ``on_use`` mode, once. Returns
    the row if its access token is accessible, else None. Introspection must not call
    this (it does not count as use).
    """
    with store.lock:
        row = store.row_by_access_token(access_token)
        if row is None:
            return None
        if row.previous_row_id is not None and store.switches.revocation_mode == "on_use":
            previous = store.token_rows.get(row.previous_row_id)
            if previous is not None:
                store.revoke_row(previous)
            row.previous_row_id = None
        return row if row.is_accessible(store.now()) else None


def find_token(store: Store, token: str | None, hint: str | None) -> tuple[TokenRow, str] | None:
    """Look a token up as access or refresh token, trying ``hint`` first (RFC 7009 §2.1).

    Returns the row and which kind matched, or None.
    """
    order = (
        ("refresh_token", "access_token")
        if hint == "refresh_token"
        else (
            "access_token",
            "refresh_token",
        )
    )
    with store.lock:
        for kind in order:
            row = (
                store.row_by_access_token(token)
                if kind == "access_token"
                else store.row_by_refresh_token(token)
            )
            if row is not None:
                return row, kind
    return None


def introspect(store: Store, application: Application, token: str | None) -> dict[str, object]:
    """RFC 7662 response for ``token`` as seen by ``application``; never counts as use.

    Another application's token is reported inactive (Doorkeeper's default
    ``allow_token_introspection``). A refresh token is active while its row is not
    revoked, even if the access token expired (Doorkeeper #1860).
    """
    with store.lock:
        found = find_token(store, token, None)
        if found is None:
            return {"active": False}
        row, kind = found
        if row.client_id != application.client_id or row.is_revoked():
            return {"active": False}
        if kind == "access_token" and row.is_expired(store.now()):
            return {"active": False}
        return {
            "active": True,
            "scope": " ".join(row.scopes),
            "client_id": row.client_id,
            "token_type": "Bearer",
            "exp": int(row.expires_at),
            "iat": row.created_at,
        }


def revoke(store: Store, application: Application, token: str, hint: str | None) -> None:
    """RFC 7009 revocation with Doorkeeper's answers.

    Unknown token: nothing happens (the endpoint answers 200). A token of another
    application raises ``unauthorized_client`` (403). Otherwise the whole row (access and
    refresh token) is revoked.
    """
    with store.lock:
        found = find_token(store, token, hint)
        if found is None:
            return
        row, _kind = found
        if row.client_id != application.client_id:
            raise OAuthError("unauthorized_client", status=403)
        store.revoke_row(row)
