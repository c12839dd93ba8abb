"""Request parsing and response shapes shared by the blueprints.

* OAuth endpoints answer RFC 6749 JSON errors ``{"error", "error_description"}``.
* API endpoints answer Stora's envelope ``{"error": {"code", "type", "message", "links",
  "request_id"}}`` (shared/stora-api/api-conventions.md §6).

Every request gets a UUID request id in ``g.request_id`` (set by :mod:`stora_sandbox.hooks`),
echoed in ``X-Request-Id`` and in Stora envelopes.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import unquote_plus

from flask import Response, g, jsonify, request

from stora_sandbox.tokens import OAuthError

# Stora's error codes → (HTTP status, error.type) (api-conventions.md §6).
STORA_ERRORS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "api_error": (400, "api_error"),
    "invalid_token": (401, "invalid_request_error"),
    "forbidden": (403, "invalid_request_error"),
    "resource_not_found": (404, "invalid_request_error"),
    "invalid_endpoint": (404, "invalid_request_error"),
    "invalid_format": (406, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "invalid_url_param": (422, "invalid_request_error"),
    "invalid_content": (422, "invalid_request_error"),
    "too_many_requests": (429, "invalid_request_error"),
    "internal_server_error": (500, "api_error"),
}

ERROR_LINKS = [
    {
        "kind": "open_api",
        "name": "OpenAPI specification",
        "url": "https://public-api.stora.co/2025-09/openapi.json",
    },
    {
        "kind": "documentation",
        "name": "Errors",
        "url": "https://docs.stora.co/public-api#overview--errors",
    },
]

NO_STORE_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def request_id() -> str:
    """The current request's id (created on first use if hooks did not run)."""
    if "request_id" not in g:
        g.request_id = str(uuid.uuid4())
    return str(g.request_id)


def stora_error_body(
    code: str, message: str, details: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """Stora's error envelope for ``code`` with the current request id.

    ``details`` (``[{"message", "pointer"}]``, JSON pointers into the request body) is
    included when given, as in Stora's ``invalid_content`` example.
    """
    error: dict[str, Any] = {"code": code}
    if details is not None:
        error["details"] = details
    error.update(
        {
            "links": ERROR_LINKS,
            "message": message,
            "request_id": request_id(),
            "type": STORA_ERRORS[code][1],
        }
    )
    return {"error": error}


def stora_code_for_status(status: int) -> str:
    """The Stora error code a response with this HTTP status would carry."""
    by_status = {
        400: "invalid_request",
        401: "invalid_token",
        403: "forbidden",
        404: "resource_not_found",
        406: "invalid_format",
        409: "conflict",
        422: "invalid_content",
        429: "too_many_requests",
    }
    return by_status.get(status, "internal_server_error" if status >= 500 else "invalid_request")


def stora_error(
    code: str,
    message: str,
    *,
    status: int | None = None,
    details: list[dict[str, str]] | None = None,
) -> Response:
    """A Stora error envelope response for ``code`` (status defaults to the code's)."""
    response = jsonify(stora_error_body(code, message, details))
    response.status_code = status or STORA_ERRORS[code][0]
    if code == "invalid_token":
        response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def oauth_error(error: OAuthError) -> Response:
    """An RFC 6749 JSON error response with Doorkeeper's headers."""
    response = jsonify({"error": error.error, "error_description": error.description})
    response.status_code = error.status
    response.headers.update(NO_STORE_HEADERS)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = (
            f'Bearer realm="Doorkeeper", error="{error.error}", '
            f'error_description="{error.description}"'
        )
    return response


def request_params() -> dict[str, str]:
    """Body parameters of a POST (JSON object or form), or the query string of a GET.

    String values only; other JSON values are ignored, as a Doorkeeper strong-params
    filter would. Cached per request. Raises ``invalid_request`` for a JSON body that is
    not an object.
    """
    if "params" in g:
        return dict(g.params)
    params: dict[str, str] = {}
    if request.method == "GET":
        params = {k: v for k, v in request.args.items()}
    elif request.is_json:
        body: Any = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise OAuthError("invalid_request", "The request body is not a JSON object.")
        params = {k: v for k, v in body.items() if isinstance(v, str)}
    else:
        params = {k: v for k, v in request.form.items()}
    g.params = params
    return dict(params)


def basic_credentials() -> tuple[str, str] | None:
    """Client id and secret from an HTTP Basic header, form-decoded (RFC 6749 §2.3.1)."""
    auth = request.authorization
    if auth is None or auth.type != "basic" or auth.username is None:
        return None
    return unquote_plus(auth.username), unquote_plus(auth.password or "")


def client_credentials(params: dict[str, str]) -> tuple[str | None, str | None]:
    """The client id and secret, from HTTP Basic or the body, but not both.

    Raises ``invalid_request`` when Basic is combined with a body secret or a different
    body client_id (RFC 6749 §2.3: one authentication method per request).
    """
    basic = basic_credentials()
    body_id, body_secret = params.get("client_id"), params.get("client_secret")
    if basic is None:
        return body_id, body_secret
    if body_secret or (body_id and body_id != basic[0]):
        raise OAuthError(
            "invalid_request", "Only one client authentication method may be used per request."
        )
    return basic


def bearer_token() -> str | None:
    """The token from ``Authorization: Bearer …``, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
