"""POST /oauth2/token with the authorization_code grant, client authentication, PKCE."""

from __future__ import annotations

import pytest

from tests.sandbox.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    READ_SCOPES,
    REDIRECT_URI,
    START,
    FakeClock,
    OAuth,
    basic,
    bearer,
    pkce_pair,
)


def test_happy_path_authorize_token_info_and_api_with_pkce(oauth: OAuth) -> None:
    verifier, challenge = pkce_pair()
    leeds = oauth.operator_id("Leeds")
    code = oauth.code(operator_id=leeds, code_challenge=challenge, code_challenge_method="S256")

    response = oauth.exchange(code, verifier)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    body = response.get_json()
    assert list(body) == [
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "scope",
        "created_at",
    ]
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 7200
    assert body["scope"] == READ_SCOPES
    assert body["created_at"] == int(START)
    assert body["access_token"] != body["refresh_token"]

    info = oauth.client.get("/oauth2/token/info", headers=bearer(body["access_token"]))
    assert info.status_code == 200
    assert info.get_json() == {
        "scope": READ_SCOPES.split(),
        "expires_in": int(START) + 7200,
        "application": {"uid": CLIENT_ID},
        "created_at": int(START),
        "operator": {"name": "Leeds City Storage Ltd"},
    }

    sites = oauth.api("/sites", body["access_token"])
    assert sites.status_code == 200
    assert sites.get_json()["meta"]["curies"][1]["href"] == (
        "https://leeds-city-storage.stora.test{rel}"
    )


@pytest.mark.parametrize("auth", ["json", "form", "basic"])
def test_client_authentication_by_json_form_or_basic(oauth: OAuth, auth: str) -> None:
    code = oauth.code()
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    response = oauth.token(body, auth=auth)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["access_token"]


def test_basic_credentials_are_form_decoded(oauth: OAuth) -> None:
    oauth.client.post(
        "/_sandbox/applications",
        json={"client_id": CLIENT_ID, "client_secret": "a b+c", "redirect_uris": [REDIRECT_URI]},
    )
    code = oauth.code()
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    response = oauth.client.post("/oauth2/token", data=body, headers=basic(CLIENT_ID, "a+b%2Bc"))
    assert response.status_code == 200


def test_basic_and_body_credentials_together_are_invalid_request(oauth: OAuth) -> None:
    code = oauth.code()
    body = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    response = oauth.client.post(
        "/oauth2/token", data=body, headers=basic(CLIENT_ID, CLIENT_SECRET)
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"
    # The code was not spent by the rejected request.
    assert oauth.exchange(code).status_code == 200


def test_basic_with_matching_body_client_id_only_is_fine(oauth: OAuth) -> None:
    code = oauth.code()
    body = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": CLIENT_ID,
    }
    response = oauth.client.post(
        "/oauth2/token", data=body, headers=basic(CLIENT_ID, CLIENT_SECRET)
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [(CLIENT_ID, "wrong"), ("unknown", CLIENT_SECRET), (CLIENT_ID, ""), (None, None)],
)
def test_bad_client_is_401_invalid_client(oauth: OAuth, client_id: str, secret: str) -> None:
    code = oauth.code()
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    if client_id is not None:
        body |= {"client_id": client_id, "client_secret": secret}
    response = oauth.client.post("/oauth2/token", json=body)
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_client"
    assert response.get_json()["error_description"]
    assert 'error="invalid_client"' in response.headers["WWW-Authenticate"]


def test_grant_type_errors(oauth: OAuth) -> None:
    for grant_type, error in [
        ("client_credentials", "unsupported_grant_type"),
        ("password", "unsupported_grant_type"),
        ("", "invalid_request"),
    ]:
        response = oauth.token({"grant_type": grant_type})
        assert response.status_code == 400
        assert response.get_json()["error"] == error


def test_json_body_that_is_not_an_object_is_invalid_request(oauth: OAuth) -> None:
    response = oauth.client.post("/oauth2/token", json=["grant_type"])
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_code_replay_is_invalid_grant_and_revokes_the_issued_tokens(oauth: OAuth) -> None:
    code = oauth.code()
    first = oauth.exchange(code).get_json()
    assert oauth.api("/orders", first["access_token"]).status_code == 200

    replay = oauth.exchange(code)
    assert replay.status_code == 400
    assert replay.get_json()["error"] == "invalid_grant"
    assert oauth.api("/orders", first["access_token"]).status_code == 401
    refreshed = oauth.refresh(first["refresh_token"])
    assert refreshed.get_json()["error"] == "invalid_grant"


def test_code_expires_after_code_ttl(oauth: OAuth, clock: FakeClock) -> None:
    code = oauth.code()
    clock.advance(600)
    response = oauth.exchange(code)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_grant"


def test_code_ttl_switch(oauth: OAuth, clock: FakeClock) -> None:
    oauth.patch_config(code_ttl=30)
    code = oauth.code()
    clock.advance(29)
    assert oauth.exchange(code).status_code == 200


def test_code_of_another_client_is_invalid_grant(oauth: OAuth) -> None:
    code = oauth.code()
    response = oauth.client.post(
        "/oauth2/token",
        json={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": OTHER_CLIENT_ID,
            "client_secret": OTHER_CLIENT_SECRET,
        },
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_grant"


def test_redirect_uri_must_match_the_authorize_request(oauth: OAuth) -> None:
    code = oauth.code()
    mismatch = oauth.exchange(code, redirect_uri=REDIRECT_URI + "/other")
    assert mismatch.status_code == 400
    assert mismatch.get_json()["error"] == "invalid_grant"
    missing = oauth.token({"grant_type": "authorization_code", "code": code})
    assert missing.get_json()["error"] == "invalid_request"
    assert oauth.exchange(code).status_code == 200


def test_unknown_or_missing_code(oauth: OAuth) -> None:
    assert oauth.exchange("not-a-code").get_json()["error"] == "invalid_grant"
    missing = oauth.token({"grant_type": "authorization_code", "redirect_uri": REDIRECT_URI})
    assert missing.get_json()["error"] == "invalid_request"


def test_pkce_wrong_verifier_is_invalid_grant(oauth: OAuth) -> None:
    verifier, challenge = pkce_pair()
    code = oauth.code(code_challenge=challenge, code_challenge_method="S256")
    wrong = oauth.exchange(code, verifier + "x")
    assert wrong.status_code == 400
    assert wrong.get_json()["error"] == "invalid_grant"
    assert oauth.exchange(code, verifier).status_code == 200


def test_pkce_missing_verifier_is_invalid_request(oauth: OAuth) -> None:
    _verifier, challenge = pkce_pair()
    code = oauth.code(code_challenge=challenge, code_challenge_method="S256")
    response = oauth.exchange(code)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_verifier_for_a_grant_without_challenge_is_rejected(oauth: OAuth) -> None:
    code = oauth.code()
    downgrade = oauth.exchange(code, "a-verifier-the-authorize-request-never-committed-to")
    assert downgrade.status_code == 400
    assert downgrade.get_json()["error"] == "invalid_grant"


def test_plain_pkce(oauth: OAuth) -> None:
    verifier = "plain-verifier-" + "x" * 40
    code = oauth.code(code_challenge=verifier, code_challenge_method="plain")
    assert oauth.exchange(code, "other").status_code == 400
    assert oauth.exchange(code, verifier).status_code == 200


def test_rfc7636_appendix_b_vector(oauth: OAuth) -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    code = oauth.code(code_challenge=challenge, code_challenge_method="S256")
    assert oauth.exchange(code, verifier).status_code == 200


def test_omit_expires_in_switch(oauth: OAuth) -> None:
    oauth.patch_config(omit_expires_in=True)
    assert "expires_in" not in oauth.connect()


def test_access_token_ttl_switch(oauth: OAuth, clock: FakeClock) -> None:
    oauth.patch_config(access_token_ttl=60)
    tokens = oauth.connect()
    assert tokens["expires_in"] == 60
    clock.advance(59)
    assert oauth.api("/sites", tokens["access_token"]).status_code == 200
    clock.advance(1)
    assert oauth.api("/sites", tokens["access_token"]).status_code == 401


def test_token_info_without_or_with_a_bad_token_is_401(oauth: OAuth) -> None:
    for headers in ({}, bearer("nope"), {"Authorization": "Basic abc"}):
        response = oauth.client.get("/oauth2/token/info", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"] == "invalid_token"
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_token_info_switches(oauth: OAuth, clock: FakeClock) -> None:
    tokens = oauth.connect(operator_id=oauth.operator_id("Camden"))
    oauth.patch_config(token_info_operator_id=True, token_info_expires_in="remaining")
    clock.advance(100)
    info = oauth.client.get("/oauth2/token/info", headers=bearer(tokens["access_token"]))
    body = info.get_json()
    assert body["operator"] == {"name": "Camden Self Store", "id": oauth.operator_id("Camden")}
    assert body["expires_in"] == 7100


def test_token_info_of_expired_token_is_401(oauth: OAuth, clock: FakeClock) -> None:
    tokens = oauth.connect()
    clock.advance(7200)
    response = oauth.client.get("/oauth2/token/info", headers=bearer(tokens["access_token"]))
    assert response.status_code == 401
