"""Helpers shared by the sandbox tests: constants, a fake clock, PKCE, and an OAuth driver.

Everything here is written against the wire (HTTP requests and responses), not against
the sandbox's internals, except where a test reads the store to check a side effect.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
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
