"""Blueprint for the OAuth 2.0 endpoints under ``/oauth2`` (Doorkeeper's routes).

* ``GET  /oauth2/authorize``  validate, then show the consent page.
* ``POST /oauth2/authorize``  the consent form: approve (issue a code) or deny.
* ``POST /oauth2/token``      ``authorization_code`` and ``refresh_token`` grants.
* ``GET  /oauth2/token/info`` the token's scopes, application and operator (a "use").
* ``POST /oauth2/introspect`` RFC 7662 (not a "use").
* ``POST /oauth2/revoke``     RFC 7009 with Doorkeeper's status codes.

Bodies may be JSON or form-encoded; clients authenticate with HTTP Basic or body
credentials, never both. The rules themselves live in :mod:`stora_sandbox.tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from flask import Blueprint, Response, current_app, g, jsonify, redirect, render_template

from stora_sandbox import tokens
from stora_sandbox.models import Application, TokenRow
from stora_sandbox.store import Store
from stora_sandbox.tokens import OAuthError
from stora_sandbox.wire import (
    NO_STORE_HEADERS,
    bearer_token,
    client_credentials,
    oauth_error,
    request_params,
)

bp = Blueprint("oauth", __name__, url_prefix="/oauth2")


def _store() -> Store:
    store: Store = current_app.extensions["stora_sandbox"]
    return store


# -- authorize ------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorizeRequest:
    """A validated authorize request: what the consent form carries and the code binds."""

    application: Application
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    code_challenge: str | None
    code_challenge_method: str | None

    def hidden_fields(self) -> dict[str, str]:
        fields = {
            "response_type": "code",
            "client_id": self.application.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.scopes),
        }
        if self.state is not None:
            fields["state"] = self.state
        if self.code_challenge:
            fields["code_challenge"] = self.code_challenge
            fields["code_challenge_method"] = self.code_challenge_method or ""
        return fields


class UntrustedRedirectError(Exception):
    """Unknown client or unregistered redirect URI: answer with an error page, never a
    redirect (RFC 6749 §4.1.2.1). The message is safe to show."""


class RedirectableError(Exception):
    """An authorize error to report by redirecting to the (already verified) client."""

    def __init__(self, error: OAuthError, redirect_uri: str, state: str | None) -> None:
        super().__init__(error.error)
        self.error = error
        self.redirect_uri = redirect_uri
        self.state = state


def _error_page(message: str, status: int = 400) -> tuple[str, int]:
    return render_template("error.html", message=message, status=status), status


def with_query(uri: str, params: dict[str, str]) -> str:
    """``uri`` with ``params`` appended to its query string, keeping existing ones."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _validate_authorize(store: Store, params: dict[str, str]) -> AuthorizeRequest:
    """Validate in Doorkeeper's order.

    Raises:
        UntrustedRedirectError: unknown client or unregistered redirect URI.
        RedirectableError: any other problem, to report at the redirect URI.
    """
    application = store.get_application(params.get("client_id"))
    if application is None:
        raise UntrustedRedirectError("Unknown client: the client_id is not registered.")
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in application.redirect_uris:
        raise UntrustedRedirectError("The redirect_uri is not registered for this client.")
    state = params.get("state")

    def fail(error: str, description: str | None = None) -> RedirectableError:
        return RedirectableError(OAuthError(error, description), redirect_uri, state)

    switches = store.switches
    response_type = params.get("response_type")
    if not response_type:
        raise fail("invalid_request", "Missing required parameter: response_type.")
    if response_type != "code":
        raise fail("unsupported_response_type")
    scopes = tokens.parse_scopes(params.get("scope")) or tokens.parse_scopes(
        switches.default_scopes
    )
    try:
        tokens.check_requested_scopes(application, scopes)
    except OAuthError as exc:
        raise RedirectableError(exc, redirect_uri, state) from None
    challenge = params.get("code_challenge") or None
    method = params.get("code_challenge_method") or None
    if switches.force_pkce and not challenge:
        raise fail("invalid_request", "Missing required parameter: code_challenge.")
    if challenge and method not in switches.accepted_pkce_methods:
        methods = " or ".join(sorted(switches.accepted_pkce_methods))
        raise fail("invalid_request", f"The code challenge method must be {methods}.")
    return AuthorizeRequest(
        application=application,
        redirect_uri=redirect_uri,
        scopes=scopes,
        state=state,
        code_challenge=challenge,
        code_challenge_method=method if challenge else None,
    )


def _redirect_error(exc: RedirectableError) -> Response:
    params = {"error": exc.error.error, "error_description": exc.error.description}
    if exc.state is not None:
        params["state"] = exc.state
    return redirect(with_query(exc.redirect_uri, params), code=302)


@bp.get("/authorize")
def authorize() -> Any:
    """Show the consent page for a valid request (see module docstring)."""
    store = _store()
    try:
        auth = _validate_authorize(store, request_params())
    except UntrustedRedirectError as exc:
        return _error_page(str(exc))
    except RedirectableError as exc:
        return _redirect_error(exc)
    return render_template(
        "consent.html",
        application=auth.application,
        scopes=auth.scopes,
        hidden_fields=auth.hidden_fields(),
        operators=store.list_operators(),
    )


@bp.post("/authorize")
def decide() -> Any:
    """Handle the consent form: ``decision=approve`` issues a code, ``deny`` refuses."""
    store = _store()
    try:
        params = request_params()
        auth = _validate_authorize(store, params)
    except OAuthError as exc:
        return _error_page(exc.description)
    except UntrustedRedirectError as exc:
        return _error_page(str(exc))
    except RedirectableError as exc:
        return _redirect_error(exc)
    decision = params.get("decision")
    state_param = {"state": auth.state} if auth.state is not None else {}
    if decision == "deny":
        return redirect(
            with_query(
                auth.redirect_uri,
                {
                    "error": "access_denied",
                    "error_description": tokens.DESCRIPTIONS["access_denied"],
                    **state_param,
                },
            ),
            code=302,
        )
    if decision != "approve":
        return _error_page("The decision must be approve or deny.")
    operator = store.get_operator(params.get("operator_id"))
    if operator is None:
        return _error_page("Choose an operator to approve the application for.")
    g.operator_id = operator.id
    grant = tokens.issue_code(
        store,
        application=auth.application,
        operator_id=operator.id,
        redirect_uri=auth.redirect_uri,
        scopes=auth.scopes,
        code_challenge=auth.code_challenge,
        code_challenge_method=auth.code_challenge_method,
    )
    return redirect(with_query(auth.redirect_uri, {"code": grant.code, **state_param}), code=302)


# -- token ----------------------------------------------------------------------------


def _token_response(row: TokenRow, *, include_refresh_token: bool) -> Response:
    switches = _store().switches
    body: dict[str, Any] = {"access_token": row.access_token, "token_type": "Bearer"}
    if not switches.omit_expires_in:
        body["expires_in"] = row.expires_in
    if include_refresh_token and row.refresh_token:
        body["refresh_token"] = row.refresh_token
    body["scope"] = " ".join(row.scopes)
    body["created_at"] = row.created_at
    response = jsonify(body)
    response.headers.update(NO_STORE_HEADERS)
    return response


@bp.post("/token")
def token() -> Response:
    """Issue tokens for the ``authorization_code`` or ``refresh_token`` grant."""
    store = _store()
    try:
        params = request_params()
        client_id, client_secret = client_credentials(params)
        grant_type = params.get("grant_type")
        if grant_type == "authorization_code":
            row = tokens.exchange_code(
                store,
                client_id=client_id,
                client_secret=client_secret,
                code=params.get("code"),
                redirect_uri=params.get("redirect_uri"),
                code_verifier=params.get("code_verifier"),
            )
            include_refresh_token = True
        elif grant_type == "refresh_token":
            row = tokens.refresh(
                store,
                client_id=client_id,
                client_secret=client_secret,
                refresh_token=params.get("refresh_token"),
                scope=params.get("scope"),
            )
            include_refresh_token = not store.switches.omit_refresh_token_on_refresh
        elif not grant_type:
            raise OAuthError("invalid_request", "Missing required parameter: grant_type.")
        else:
            raise OAuthError("unsupported_grant_type")
    except OAuthError as exc:
        return oauth_error(exc)
    g.operator_id = row.operator_id
    return _token_response(row, include_refresh_token=include_refresh_token)


@bp.get("/token/info")
def token_info() -> Response:
    """Describe the bearer token, including its operator. Counts as a use."""
    store = _store()
    row = tokens.authenticate_access_token(store, bearer_token())
    if row is None:
        error = OAuthError("invalid_token", status=401)
        response = oauth_error(error)
        response.headers["WWW-Authenticate"] = (
            f'Bearer realm="Doorkeeper", error="invalid_token", '
            f'error_description="{error.description}"'
        )
        return response
    g.client_id = row.client_id
    g.operator_id = row.operator_id
    switches = store.switches
    operator = store.get_operator(row.operator_id)
    operator_body: dict[str, Any] = {"name": operator.name if operator else None}
    if switches.token_info_operator_id:
        operator_body["id"] = row.operator_id
    if switches.token_info_expires_in == "absolute":  # noqa: S105 - a mode name
        expires_in = int(row.expires_at)
    else:
        expires_in = max(0, int(row.expires_at - store.now()))
    return jsonify(
        {
            "scope": list(row.scopes),
            "expires_in": expires_in,
            "application": {"uid": row.client_id},
            "created_at": row.created_at,
            "operator": operator_body,
        }
    )


@bp.post("/introspect")
def introspect() -> Response:
    """RFC 7662 introspection for the authenticated client; does not count as a use."""
    store = _store()
    try:
        params = request_params()
        client_id, client_secret = client_credentials(params)
        application = tokens.authenticate_client(store, client_id, client_secret)
        token_value = params.get("token")
        if not token_value:
            raise OAuthError("invalid_request", "Missing required parameter: token.")
    except OAuthError as exc:
        return oauth_error(exc)
    body = tokens.introspect(store, application, token_value)
    found = tokens.find_token(store, token_value, None)
    if found is not None and body["active"]:
        g.operator_id = found[0].operator_id
    return jsonify(body)


@bp.post("/revoke")
def revoke() -> Response:
    """RFC 7009 revocation; Doorkeeper answers 403 for an unauthenticated client."""
    store = _store()
    try:
        params = request_params()
        client_id, client_secret = client_credentials(params)
    except OAuthError as exc:
        return oauth_error(exc)
    try:
        application = tokens.authenticate_client(store, client_id, client_secret)
    except OAuthError:
        return oauth_error(OAuthError("unauthorized_client", status=403))
    token_value = params.get("token")
    if token_value:
        try:
            tokens.revoke(store, application, token_value, params.get("token_type_hint"))
        except OAuthError as exc:
            return oauth_error(exc)
    return jsonify({})
