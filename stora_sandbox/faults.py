"""Fault injection: queued misbehaviour for the next matching requests.

A fault (``POST /_sandbox/faults``) matches by endpoint label (see :func:`endpoint_for`)
and, for the token endpoint, optionally by ``grant_type``. What it does, in order:

1. ``latency_ms``: sleep before the request is processed.
2. ``mode="drop_before_commit"``: close the connection without a response; the request
   is *not* processed.
3. ``status`` and/or ``body`` (without a ``mode``): answer with them instead of
   processing the request (status defaults to 500, the body to a plausible error).
   Such an answer is not stored under the request's ``Idempotency-Key`` unless the
   fault has ``"stored": true``, which plays "the application failed and Stora stored
   the error" (a retry with the same key then gets it again).
4. Otherwise the request is processed normally (tokens issued, rotated, "used"), then:
   ``latency_after_commit_ms`` sleeps; ``mode="drop_after_commit"`` closes the connection
   without a response; ``mode="malformed_json"`` replaces the body with truncated JSON
   (keeping the real status unless ``status`` is given); ``headers`` are added to the
   real response.

Dropping works at the WSGI layer (:class:`DropConnectionMiddleware`): the app marks the
environ, the middleware shuts the socket down (werkzeug exposes it as
``environ["werkzeug.socket"]``) and raises :class:`ConnectionDropped`. Werkzeug's server
treats a ``ConnectionError`` as a client disconnect and writes nothing, so the client
sees the connection close with no response. Under Flask's test client (no socket) the
exception simply propagates to the caller.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Response, jsonify

from stora_sandbox.models import Fault
from stora_sandbox.wire import stora_code_for_status, stora_error_body

ENDPOINTS = frozenset({"authorize", "token", "token_info", "introspect", "revoke", "api"})
MODES = frozenset({"drop_after_commit", "drop_before_commit", "malformed_json"})
DROP_ENVIRON_KEY = "stora_sandbox.drop_connection"

# Deliberately cut mid-value, and free of any real token, so a client that logs the raw
# body on a parse error leaks nothing.
MALFORMED_BODY = b'{"token_type": "Bearer", "access_tok'

_PATH_ENDPOINTS = {
    "/oauth2/authorize": "authorize",
    "/oauth2/token": "token",
    "/oauth2/token/info": "token_info",
    "/oauth2/introspect": "introspect",
    "/oauth2/revoke": "revoke",
}


class ConnectionDropped(ConnectionError):
    """Raised instead of answering when a fault drops the connection."""


def endpoint_for(path: str) -> str | None:
    """The fault/log endpoint label of a request path, or None outside the wire API."""
    if path in _PATH_ENDPOINTS:
        return _PATH_ENDPOINTS[path]
    if path == "/2025-09" or path.startswith("/2025-09/"):
        return "api"
    return None


def parse_fault(body: Any) -> dict[str, Any]:
    """Validate a ``POST /_sandbox/faults`` body into :class:`Fault` fields.

    Raises:
        ValueError: with a message naming the offending field.
    """
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    allowed = {
        "endpoint",
        "status",
        "body",
        "headers",
        "latency_ms",
        "latency_after_commit_ms",
        "mode",
        "count",
        "grant_type",
        "stored",
    }
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(unknown)}")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of: {', '.join(sorted(ENDPOINTS))}")
    status = body.get("status")
    if status is not None and (type(status) is not int or not 100 <= status <= 599):
        raise ValueError("status must be an integer HTTP status")
    mode = body.get("mode")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of: {', '.join(sorted(MODES))}")
    headers = body.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
        raise ValueError("headers must be an object of strings")
    count = body.get("count", 1)
    if type(count) is not int or (count < 1 and count != -1):
        raise ValueError("count must be a positive integer or -1 (forever)")
    latencies = {}
    for key in ("latency_ms", "latency_after_commit_ms"):
        value = body.get(key, 0)
        if type(value) is not int or value < 0:
            raise ValueError(f"{key} must be a non-negative integer")
        latencies[key] = value
    grant_type = body.get("grant_type")
    if grant_type is not None and not isinstance(grant_type, str):
        raise ValueError("grant_type must be a string")
    stored = body.get("stored", False)
    if type(stored) is not bool:
        raise ValueError("stored must be a boolean")
    return {
        "endpoint": endpoint,
        "status": status,
        "body": body.get("body"),
        "headers": {k: str(v) for k, v in headers.items()},
        "mode": mode,
        "remaining": count,
        "grant_type": grant_type,
        "stored": stored,
        **latencies,
    }


def _default_body(fault: Fault, status: int) -> dict[str, Any]:
    """A plausible error body for a status-only fault, in the endpoint's own format."""
    if fault.endpoint == "api":
        return stora_error_body(stora_code_for_status(status), f"Injected fault (HTTP {status}).")
    return {"error": "server_error", "error_description": f"Injected fault (HTTP {status})."}


def response_before_view(fault: Fault, environ: dict[str, Any]) -> Response | None:
    """The response that replaces processing, or None to process the request.

    Sleeps for ``latency_ms`` first.
    """
    if fault.latency_ms:
        time.sleep(fault.latency_ms / 1000)
    if fault.mode == "drop_before_commit":
        environ[DROP_ENVIRON_KEY] = True
        return Response(status=500)
    if fault.mode is None and (fault.status is not None or fault.body is not None):
        status = fault.status or 500
        body = fault.body if fault.body is not None else _default_body(fault, status)
        response = jsonify(body)
        response.status_code = status
        response.headers.update(fault.headers)
        return response
    return None


def apply_after_view(fault: Fault, response: Response, environ: dict[str, Any]) -> Response:
    """Alter the real response of a processed request as the fault asks."""
    if fault.latency_after_commit_ms:
        time.sleep(fault.latency_after_commit_ms / 1000)
    if fault.mode == "drop_after_commit":
        environ[DROP_ENVIRON_KEY] = True
        return response
    if fault.mode == "malformed_json":
        response.set_data(MALFORMED_BODY)
        response.mimetype = "application/json"
        if fault.status is not None:
            response.status_code = fault.status
    response.headers.update(fault.headers)
    return response


def is_dropped(environ: dict[str, Any]) -> bool:
    return bool(environ.get(DROP_ENVIRON_KEY))


StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class DropConnectionMiddleware:
    """Wraps the Flask WSGI app; turns a marked request into a dropped connection."""

    def __init__(self, wsgi_app: WSGIApp) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def guarded_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            # Flask starts the response before returning; for a drop nothing may reach
            # the server's writer, so the real start_response is never called.
            if is_dropped(environ):
                return lambda _data: None
            return start_response(status, headers, exc_info)

        result = self.wsgi_app(environ, guarded_start_response)
        if not is_dropped(environ):
            return result
        close = getattr(result, "close", None)
        if close is not None:
            close()
        sock = environ.get("werkzeug.socket")
        if sock is not None:
            # Without the shutdown werkzeug's HTTP/1.1 handler would wait for another
            # request on this connection and the client would hang instead of failing.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        raise ConnectionDropped("stora_sandbox fault: connection dropped without a response")
