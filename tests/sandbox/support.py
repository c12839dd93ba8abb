"""Helpers shared by the sandbox tests: constants, a fake clock, PKCE, an OAuth driver and
a local webhook receiver.

Everything here is written against the wire (HTTP requests and responses), not against
the sandbox's internals, except where a test reads the store to check a side effect.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from stora_sandbox.store import Store

CLIENT_ID = "sandbox-test-client"
CLIENT_SECRET = "sandbox-test-secret"
REDIRECT_URI = "https://partner.example/stora/callback"
OTHER_CLIENT_ID = "other-client"
OTHER_CLIENT_SECRET = "other-secret"
OTHER_REDIRECT_URI = "https://other.example/cb"
READ_SCOPES = "public.site:read public.contact:read public.order:read"
TIMELINE_SCOPES = (
    "public.timeline_source:read public.timeline_template:read public.timeline_event:write"
)
WEBHOOK_SCOPES = "public.webhook_endpoint:read public.webhook_endpoint:write"
ALL_TEST_SCOPES = f"{READ_SCOPES} {TIMELINE_SCOPES} {WEBHOOK_SCOPES}"
START = 1_760_432_400.0  # the docs example's created_at


class FakeClock:
    """Epoch clock that only moves when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pkce_pair() -> tuple[str, str]:
    """A fresh (verifier, S256 challenge), computed independently of the sandbox."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def query_of(location: str) -> dict[str, str]:
    """Single-valued query parameters of a redirect Location."""
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


class OAuth:
    """Drives the sandbox like a partner client would, over the Flask test client."""

    def __init__(self, client: FlaskClient, store: Store) -> None:
        self.client = client
        self.store = store

    def operator_id(self, name_prefix: str = "Leeds") -> str:
        return next(o.id for o in self.store.list_operators() if o.name.startswith(name_prefix))

    def authorize_params(self, **overrides: Any) -> dict[str, str]:
        params = {
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": REDIRECT_URI,
            "scope": READ_SCOPES,
            "state": "state-123",
        }
        params.update({k: v for k, v in overrides.items() if v is not None})
        return {k: v for k, v in params.items() if v != ""}

    def decide(self, decision: str = "approve", operator_id: str | None = None, **params: Any):
        form = self.authorize_params(**params)
        form["decision"] = decision
        form["operator_id"] = operator_id or self.operator_id()
        return self.client.post("/oauth2/authorize", data=form)

    def code(self, **params: Any) -> str:
        response = self.decide(**params)
        assert response.status_code == 302, response.get_data(as_text=True)
        return query_of(response.headers["Location"])["code"]

    def token(
        self, body: dict[str, Any], *, auth: str = "json", secret: str = CLIENT_SECRET
    ) -> TestResponse:
        """POST /oauth2/token with client auth by ``json`` body, ``form`` body or ``basic``."""
        if auth == "basic":
            return self.client.post("/oauth2/token", data=body, headers=basic(CLIENT_ID, secret))
        payload = {**body, "client_id": CLIENT_ID, "client_secret": secret}
        if auth == "form":
            return self.client.post("/oauth2/token", data=payload)
        return self.client.post("/oauth2/token", json=payload)

    def exchange(self, code: str, verifier: str | None = None, **extra: Any) -> TestResponse:
        body = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
        if verifier is not None:
            body["code_verifier"] = verifier
        body.update(extra)
        return self.token(body)

    def connect(self, operator_id: str | None = None, scope: str = READ_SCOPES) -> dict[str, Any]:
        """Full PKCE flow; returns the token response body."""
        verifier, challenge = pkce_pair()
        code = self.code(
            operator_id=operator_id,
            scope=scope,
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        response = self.exchange(code, verifier)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def refresh(self, refresh_token: str, **extra: Any) -> TestResponse:
        return self.token({"grant_type": "refresh_token", "refresh_token": refresh_token, **extra})

    def api(self, path: str, token: str) -> TestResponse:
        return self.client.get(f"/2025-09{path}", headers=bearer(token))

    def patch_config(self, **changes: Any) -> dict[str, Any]:
        response = self.client.patch("/_sandbox/config", json=changes)
        assert response.status_code == 200, response.get_json()
        return response.get_json()


def admin(oauth: OAuth, method: str, path: str, expected: int = 200, **kwargs: Any) -> Any:
    """Call ``/_sandbox/<path>`` and assert the status; return the JSON body."""
    response = oauth.client.open(f"/_sandbox/{path}", method=method, **kwargs)
    assert response.status_code == expected, response.get_data(as_text=True)
    return response.get_json()


@dataclass
class Received:
    """One request the receiver got: headers (case-insensitive lookups via ``header``),
    the raw body bytes and the monotonic arrival time."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class Receiver:
    """A tiny threaded HTTP server on a free loopback port that records every POST.

    ``respond`` maps the 1-based number of the request to ``(status, delay_s)``; the
    default answers 200 at once.
    """

    def __init__(self, respond: Callable[[int], tuple[int, float]] | None = None) -> None:
        self.respond = respond or (lambda _n: (200, 0.0))
        self.received: list[Received] = []
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, dict(self.headers.items()), body, time.monotonic())
                    )
                    number = len(receiver.received)
                    receiver._lock.notify_all()
                status, delay = receiver.respond(number)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up (timeout) before the answer

            def log_message(self, *_args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/stora/webhooks/conn_1"

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until at least ``count`` requests arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"got {len(self.received)} requests, wanted {count}")
                self._lock.wait(remaining)
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
