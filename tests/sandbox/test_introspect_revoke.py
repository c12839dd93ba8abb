"""POST /oauth2/introspect (RFC 7662) and POST /oauth2/revoke (RFC 7009, Doorkeeper codes)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.sandbox.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    START,
    FakeClock,
    OAuth,
    basic,
)


def introspect(oauth: OAuth, token: str, client: tuple[str, str] = (CLIENT_ID, CLIENT_SECRET)):
    return oauth.client.post("/oauth2/introspect", data={"token": token}, headers=basic(*client))


def revoke(oauth: OAuth, body: dict[str, Any], client: tuple[str, str] | None = None):
    if client is None:
        return oauth.client.post("/oauth2/revoke", json=body)
    return oauth.client.post(
        "/oauth2/revoke", json={**body, "client_id": client[0], "client_secret": client[1]}
    )


def test_introspect_active_access_token(oauth: OAuth) -> None:
    tokens = oauth.connect(scope="public.order:read")
    body = introspect(oauth, tokens["access_token"]).get_json()
    assert body == {
        "active": True,
        "scope": "public.order:read",
        "client_id": CLIENT_ID,
        "token_type": "Bearer",
        "exp": int(START) + 7200,
        "iat": int(START),
    }


def test_introspect_inactive_cases(oauth: OAuth, clock: FakeClock) -> None:
    tokens = oauth.connect()
    assert introspect(oauth, "unknown").get_json() == {"active": False}
    assert introspect(
        oauth, tokens["access_token"], (OTHER_CLIENT_ID, OTHER_CLIENT_SECRET)
    ).get_json() == {"active": False}
    clock.advance(7200)
    assert introspect(oauth, tokens["access_token"]).get_json() == {"active": False}
    # A refresh token outlives its access token (Doorkeeper #1860).
    assert introspect(oauth, tokens["refresh_token"]).get_json()["active"] is True


def test_introspect_needs_client_auth_and_token(oauth: OAuth) -> None:
    tokens = oauth.connect()
    anonymous = oauth.client.post("/oauth2/introspect", data={"token": tokens["access_token"]})
    assert anonymous.status_code == 401
    assert anonymous.get_json()["error"] == "invalid_client"
    missing = oauth.client.post("/oauth2/introspect", headers=basic(CLIENT_ID, CLIENT_SECRET))
    assert missing.status_code == 400
    assert missing.get_json()["error"] == "invalid_request"


def test_revoke_requires_client_authentication(oauth: OAuth) -> None:
    tokens = oauth.connect()
    for client in (None, (CLIENT_ID, "wrong")):
        response = revoke(oauth, {"token": tokens["access_token"]}, client)
        assert response.status_code == 403
        assert response.get_json()["error"] == "unauthorized_client"
    assert oauth.api("/sites", tokens["access_token"]).status_code == 200


def test_revoke_unknown_or_missing_token_is_200_empty(oauth: OAuth) -> None:
    assert revoke(oauth, {"token": "unknown"}, (CLIENT_ID, CLIENT_SECRET)).get_json() == {}
    response = revoke(oauth, {}, (CLIENT_ID, CLIENT_SECRET))
    assert response.status_code == 200
    assert response.get_json() == {}


def test_revoking_another_applications_token_is_403(oauth: OAuth) -> None:
    tokens = oauth.connect()
    response = revoke(
        oauth, {"token": tokens["access_token"]}, (OTHER_CLIENT_ID, OTHER_CLIENT_SECRET)
    )
    assert response.status_code == 403
    assert response.get_json()["error"] == "unauthorized_client"
    assert oauth.api("/sites", tokens["access_token"]).status_code == 200


@pytest.mark.parametrize(
    ("which", "hint"),
    [
        ("access_token", None),
        ("access_token", "refresh_token"),  # wrong hint falls back
        ("refresh_token", "refresh_token"),
        ("refresh_token", "access_token"),
        ("refresh_token", None),
    ],
)
def test_revoking_either_token_revokes_the_whole_row(oauth: OAuth, which: str, hint) -> None:
    tokens = oauth.connect()
    body = {"token": tokens[which]}
    if hint:
        body["token_type_hint"] = hint
    response = oauth.client.post(
        "/oauth2/revoke", data=body, headers=basic(CLIENT_ID, CLIENT_SECRET)
    )
    assert response.status_code == 200
    assert response.get_json() == {}
    assert oauth.api("/sites", tokens["access_token"]).status_code == 401
    assert oauth.refresh(tokens["refresh_token"]).get_json()["error"] == "invalid_grant"


def test_revoke_is_idempotent(oauth: OAuth) -> None:
    tokens = oauth.connect()
    for _ in range(2):
        response = revoke(oauth, {"token": tokens["refresh_token"]}, (CLIENT_ID, CLIENT_SECRET))
        assert response.status_code == 200


def test_refresh_token_with_expired_access_token_can_be_revoked(
    oauth: OAuth, clock: FakeClock
) -> None:
    tokens = oauth.connect()
    clock.advance(8000)
    revoke(oauth, {"token": tokens["refresh_token"]}, (CLIENT_ID, CLIENT_SECRET))
    assert oauth.refresh(tokens["refresh_token"]).get_json()["error"] == "invalid_grant"


def test_revoke_with_both_auth_methods_is_invalid_request(oauth: OAuth) -> None:
    tokens = oauth.connect()
    response = oauth.client.post(
        "/oauth2/revoke",
        data={"token": tokens["access_token"], "client_secret": CLIENT_SECRET},
        headers=basic(CLIENT_ID, CLIENT_SECRET),
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"
