"""Stora's OAuth 2.0 endpoints, from the client side, through Authlib.

``StoraOAuth`` builds authorization URLs (PKCE S256 always), exchanges codes, refreshes,
reads token info and revokes. It is plain Python: no Flask, no database. Every call has
connect and read timeouts and ends either in a value or in an ``OAuthError`` subclass.

Authlib's own auto-refresh is never used: refresh goes through the platform's
single-flight path, which owns when and how a new pair is stored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import requests
from authlib.integrations.requests_client import OAuth2Session

from partner_app.stora.client import retry_after
from partner_app.stora.errors import (
    InvalidClient,
    InvalidGrant,
    MalformedTokenResponse,
    OAuthError,
    OAuthRequestRejected,
    OAuthUnavailable,
)

log = logging.getLogger(__name__)

# Stora documents a 2-hour access token; assumed when a response omits expires_in, so a
# missing field never disables refresh.
DEFAULT_EXPIRES_IN = 7200


@dataclass(frozen=True)
class TokenSet:
    """A validated token response. ``expires_at`` is computed from the earlier of our
    send time and Stora's ``created_at``, so clock skew can only make us refresh early."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: datetime
    created_at: datetime | None
    scope: str


@dataclass(frozen=True)
class TokenInfo:
    """What ``GET /oauth2/token/info`` says about a token: the operator above all."""

    operator_name: str
    operator_id: str | None
    scopes: tuple[str, ...]
    application_uid: str | None
    raw_operator_keys: tuple[str, ...]

    @property
    def identity(self) -> str:
        """Stable key for "which operator is this": the id when Stora gives one."""
        if self.operator_id:
            return f"id:{self.operator_id}"
        return f"name:{self.operator_name}"


def _json_body_auth(client: Any, method: str, uri: str, headers: dict, body: str):
    """Client authentication as Stora documents it: credentials inside a JSON body."""
    params = dict(parse_qsl(body or "", keep_blank_values=True))
    params["client_id"] = client.client_id
    params["client_secret"] = client.client_secret or ""
    encoded = json.dumps(params)
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(encoded.encode()))
    return uri, headers, encoded


_AUTH_METHOD = {
    "json_body": "client_secret_json",
    "form_body": "client_secret_post",
    "basic": "client_secret_basic",
}


def classify_oauth_response(resp: requests.Response) -> requests.Response:
    """Raise a typed error for anything but a 2xx JSON object; return the response."""
    status = resp.status_code
    try:
        payload = resp.json()
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):  # Stora's API envelope rather than RFC 6749
        error = error.get("code")
    if status == 429 or status >= 500:
        raise OAuthUnavailable(f"token endpoint answered {status}", status=status,
                               code=error if isinstance(error, str) else None,
                               retry_after=retry_after(resp))
    if 200 <= status < 300:
        if not isinstance(payload, dict):
            raise MalformedTokenResponse("token endpoint answered 2xx with no JSON object",
                                         status=status)
        return resp
    code = error if isinstance(error, str) else None
    if code == "invalid_grant":
        raise InvalidGrant("invalid_grant", status=status, code=code)
    if code == "invalid_client" or (status == 401 and code is None):
        raise InvalidClient("invalid_client", status=status, code=code or "invalid_client")
    raise OAuthRequestRejected(f"token endpoint rejected the request: {code or status}",
                               status=status, code=code)


def parse_token_response(payload: dict[str, Any], *, sent_at: float,
                         previous_refresh_token: str | None = None) -> TokenSet:
    """Validate a token response (RFC 6749 §5.1) into a TokenSet.

    A refresh response without ``refresh_token`` keeps ``previous_refresh_token``; a
    missing ``expires_in`` assumes Stora's documented 7200 s.
    """
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise MalformedTokenResponse("token response has no access_token")
    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise MalformedTokenResponse("token response token_type is not Bearer")
    try:
        expires_in = None if isinstance(payload.get("expires_in"), bool) \
            else int(payload.get("expires_in"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        expires_in = None
    if expires_in is None or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    created_raw = payload.get("created_at")
    created_at = None
    start = sent_at
    if isinstance(created_raw, int | float) and not isinstance(created_raw, bool):
        created_at = datetime.fromtimestamp(created_raw, UTC)
        start = min(sent_at, float(created_raw))
    refresh_token = payload.get("refresh_token") or previous_refresh_token
    scope = payload.get("scope") or ""
    if isinstance(scope, list):
        scope = " ".join(str(s) for s in scope)
    return TokenSet(
        access_token=access_token,
        refresh_token=refresh_token if isinstance(refresh_token, str) else None,
        expires_at=datetime.fromtimestamp(start, UTC) + timedelta(seconds=int(expires_in)),
        created_at=created_at,
        scope=str(scope),
    )


class StoraOAuth:
    """Client for Stora's OAuth endpoints for one registered partner application."""

    def __init__(self, *, client_id: str, client_secret: str, authorize_url: str,
                 api_base: str, redirect_uri: str, scopes: tuple[str, ...],
                 token_auth: str = "json_body",  # noqa: S107
                 timeout: tuple[float, float] = (3.0, 10.0)):
        self.client_id = client_id
        self._client_secret = client_secret
        self.authorize_url = authorize_url
        self.token_url = api_base.rstrip("/") + "/oauth2/token"
        self.token_info_url = api_base.rstrip("/") + "/oauth2/token/info"
        self.revoke_url = api_base.rstrip("/") + "/oauth2/revoke"
        self.redirect_uri = redirect_uri
        self.scopes = scopes
        self.token_auth = token_auth
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<StoraOAuth client_id={self.client_id} token_url={self.token_url}>"

    def _session(self) -> OAuth2Session:
        session = OAuth2Session(
            client_id=self.client_id,
            client_secret=self._client_secret,
            scope=" ".join(self.scopes),
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method=_AUTH_METHOD[self.token_auth],
            revocation_endpoint_auth_method=_AUTH_METHOD[self.token_auth],
        )
        session.register_client_auth_method(("client_secret_json", _json_body_auth))
        for hook in ("access_token_response", "refresh_token_response"):
            session.register_compliance_hook(hook, classify_oauth_response)
        session.headers["Accept"] = "application/json"
        return session

    def authorization_url(self, *, state: str, code_verifier: str) -> str:
        """The URL to send the operator's browser to (PKCE S256, exact redirect_uri)."""
        with self._session() as session:
            url, _ = session.create_authorization_url(
                self.authorize_url, state=state, code_verifier=code_verifier)
        return url

    def _token_call(self, fn: Callable[[OAuth2Session], dict[str, Any]], what: str) -> dict:
        try:
            with self._session() as session:
                return dict(fn(session))
        except OAuthError:
            raise
        except requests.Timeout as exc:
            raise OAuthUnavailable(f"{what}: timed out") from exc
        except requests.RequestException as exc:
            raise OAuthUnavailable(f"{what}: {type(exc).__name__}") from exc
        except ValueError as exc:  # unreadable JSON after a 2xx
            raise MalformedTokenResponse(f"{what}: unreadable response") from exc

    def exchange_code(self, *, code: str, code_verifier: str) -> TokenSet:
        """Trade an authorization code for tokens. Never retried: a code is single-use."""
        sent_at = time.time()
        payload = self._token_call(
            lambda s: s.fetch_token(self.token_url, grant_type="authorization_code",
                                    code=code, code_verifier=code_verifier,
                                    redirect_uri=self.redirect_uri, timeout=self.timeout),
            "code exchange")
        return parse_token_response(payload, sent_at=sent_at)

    def refresh(self, refresh_token: str) -> TokenSet:
        """Spend a refresh token. The caller stores the result before using it."""
        sent_at = time.time()
        payload = self._token_call(
            lambda s: s.refresh_token(self.token_url, refresh_token=refresh_token,
                                      timeout=self.timeout),
            "refresh")
        return parse_token_response(payload, sent_at=sent_at,
                                    previous_refresh_token=refresh_token)

    def token_info(self, access_token: str) -> TokenInfo:
        """Ask Stora which operator a token belongs to. Counts as a use of the token."""
        try:
            resp = requests.get(self.token_info_url, timeout=self.timeout, headers={
                "Authorization": f"Bearer {access_token}", "Accept": "application/json"})
        except requests.Timeout as exc:
            raise OAuthUnavailable("token info: timed out") from exc
        except requests.RequestException as exc:
            raise OAuthUnavailable(f"token info: {type(exc).__name__}") from exc
        if resp.status_code == 401:
            raise InvalidGrant("token info: access token rejected", status=401,
                               code="invalid_token")
        classify_oauth_response(resp)
        payload = resp.json()
        operator = payload.get("operator")
        if not isinstance(operator, dict) or not isinstance(operator.get("name"), str) \
                or not operator["name"].strip():
            raise OAuthRequestRejected("token info has no operator name", status=resp.status_code,
                                       code="operator_unknown")
        scopes = payload.get("scope") or []
        if isinstance(scopes, str):
            scopes = scopes.split()
        raw_id = operator.get("id")
        application = payload.get("application")
        return TokenInfo(
            operator_name=operator["name"].strip(),
            operator_id=str(raw_id) if raw_id not in (None, "") else None,
            scopes=tuple(str(s) for s in scopes),
            application_uid=application.get("uid") if isinstance(application, dict) else None,
            raw_operator_keys=tuple(sorted(operator)),
        )

    def revoke(self, token: str, *, token_type_hint: str = "refresh_token") -> None:  # noqa: S107
        """RFC 7009 revocation. 200 (also for unknown tokens) is success."""
        try:
            with self._session() as session:
                resp = session.revoke_token(self.revoke_url, token=token,
                                            token_type_hint=token_type_hint,
                                            timeout=self.timeout)
        except requests.Timeout as exc:
            raise OAuthUnavailable("revoke: timed out") from exc
        except requests.RequestException as exc:
            raise OAuthUnavailable(f"revoke: {type(exc).__name__}") from exc
        if resp.status_code == 200:
            return
        classify_oauth_response(resp)
