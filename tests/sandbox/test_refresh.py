"""The refresh_token grant in both Doorkeeper revocation modes, and what counts as "use"."""

from __future__ import annotations

import pytest

from tests.sandbox.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    FakeClock,
    OAuth,
    bearer,
)


def refreshed(oauth: OAuth, refresh_token: str) -> dict:
    response = oauth.refresh(refresh_token)
    assert response.status_code == 200, response.get_json()
    assert response.headers["Cache-Control"] == "no-store"
    return response.get_json()


def assert_invalid_grant(oauth: OAuth, refresh_token: str) -> None:
    response = oauth.refresh(refresh_token)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_grant"
    assert "error_description" in response.get_json()


# -- on_use (default) -----------------------------------------------------------------


def test_on_use_old_refresh_token_works_again_until_new_access_token_is_used(
    oauth: OAuth,
) -> None:
    first = oauth.connect()
    second = refreshed(oauth, first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]

    # Old row still alive: the old access token works and the old refresh token can be
    # spent again (a retry after a lost response), minting yet another pair.
    assert oauth.api("/sites", first["access_token"]).status_code == 200
    third = refreshed(oauth, first["refresh_token"])
    assert third["access_token"] not in {first["access_token"], second["access_token"]}

    # First use of the newest pair's access token revokes the row it was refreshed from.
    assert oauth.api("/sites", third["access_token"]).status_code == 200
    assert_invalid_grant(oauth, first["refresh_token"])
    assert oauth.api("/sites", first["access_token"]).status_code == 401
    # The orphan from the first refresh is untouched and still usable.
    assert oauth.api("/sites", second["access_token"]).status_code == 200
    assert refreshed(oauth, third["refresh_token"])["access_token"]


def test_on_use_new_row_records_previous_and_copies_scopes_and_lifetime(
    oauth: OAuth, store
) -> None:
    oauth.patch_config(access_token_ttl=900)
    first = oauth.connect(scope="public.order:read public.site:read")
    oauth.patch_config(access_token_ttl=7200)
    second = refreshed(oauth, first["refresh_token"])
    # Doorkeeper copies expires_in from the refreshed row, not from the current setting.
    assert second["expires_in"] == 900
    assert second["scope"] == "public.order:read public.site:read"
    old_row = store.row_by_refresh_token(first["refresh_token"])
    new_row = store.row_by_access_token(second["access_token"])
    assert new_row.previous_row_id == old_row.id
    assert old_row.revoked_at is None


def test_token_info_counts_as_use(oauth: OAuth) -> None:
    first = oauth.connect()
    second = refreshed(oauth, first["refresh_token"])
    info = oauth.client.get("/oauth2/token/info", headers=bearer(second["access_token"]))
    assert info.status_code == 200
    assert_invalid_grant(oauth, first["refresh_token"])


def test_introspect_does_not_count_as_use(oauth: OAuth) -> None:
    first = oauth.connect()
    second = refreshed(oauth, first["refresh_token"])
    response = oauth.client.post(
        "/oauth2/introspect",
        json={
            "token": second["access_token"],
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    assert response.get_json()["active"] is True
    assert refreshed(oauth, first["refresh_token"])["access_token"]


def test_a_scope_403_still_counts_as_use(oauth: OAuth) -> None:
    first = oauth.connect(scope="public.order:read")
    second = refreshed(oauth, first["refresh_token"])
    assert oauth.api("/sites", second["access_token"]).status_code == 403
    assert_invalid_grant(oauth, first["refresh_token"])


def test_concurrent_style_refreshes_in_on_use_all_succeed(oauth: OAuth) -> None:
    first = oauth.connect()
    pairs = [refreshed(oauth, first["refresh_token"]) for _ in range(5)]
    assert len({p["access_token"] for p in pairs}) == 5


# -- immediate ------------------------------------------------------------------------


def test_immediate_mode_revokes_old_row_at_refresh(oauth: OAuth) -> None:
    oauth.patch_config(revocation_mode="immediate")
    first = oauth.connect()
    second = refreshed(oauth, first["refresh_token"])
    assert oauth.api("/sites", first["access_token"]).status_code == 401
    assert_invalid_grant(oauth, first["refresh_token"])
    assert oauth.api("/sites", second["access_token"]).status_code == 200
    assert refreshed(oauth, second["refresh_token"])["access_token"]


# -- common rules ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["on_use", "immediate"])
def test_refresh_works_after_access_token_expired(
    oauth: OAuth, clock: FakeClock, mode: str
) -> None:
    oauth.patch_config(revocation_mode=mode)
    first = oauth.connect()
    clock.advance(10 * 365 * 86400)  # refresh tokens never expire
    assert oauth.api("/sites", first["access_token"]).status_code == 401
    second = refreshed(oauth, first["refresh_token"])
    assert second["created_at"] == int(clock.now)
    assert oauth.api("/sites", second["access_token"]).status_code == 200


def test_unknown_or_missing_refresh_token(oauth: OAuth) -> None:
    assert_invalid_grant(oauth, "not-a-refresh-token")
    missing = oauth.token({"grant_type": "refresh_token"})
    assert missing.status_code == 400
    assert missing.get_json()["error"] == "invalid_request"


def test_refresh_token_of_another_client_is_invalid_grant(oauth: OAuth) -> None:
    tokens = oauth.connect()
    response = oauth.client.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": OTHER_CLIENT_ID,
            "client_secret": OTHER_CLIENT_SECRET,
        },
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_grant"


def test_refresh_with_bad_client_is_invalid_client(oauth: OAuth) -> None:
    tokens = oauth.connect()
    response = oauth.token(
        {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, secret="bad"
    )
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_client"


@pytest.mark.parametrize("auth", ["form", "basic"])
def test_refresh_accepts_form_and_basic(oauth: OAuth, auth: str) -> None:
    tokens = oauth.connect()
    body = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    assert oauth.token(body, auth=auth).status_code == 200


def test_scope_may_narrow_but_not_widen(oauth: OAuth) -> None:
    tokens = oauth.connect(scope="public.order:read public.site:read")
    wider = oauth.refresh(tokens["refresh_token"], scope="public.order:read public.contact:read")
    assert wider.status_code == 400
    assert wider.get_json()["error"] == "invalid_scope"
    narrower = oauth.refresh(tokens["refresh_token"], scope="public.order:read")
    assert narrower.get_json()["scope"] == "public.order:read"


@pytest.mark.parametrize("mode", ["on_use", "immediate"])
def test_omit_refresh_token_on_refresh_keeps_the_old_one_valid(oauth: OAuth, mode: str) -> None:
    oauth.patch_config(omit_refresh_token_on_refresh=True, revocation_mode=mode)
    first = oauth.connect()
    assert "refresh_token" in first  # the code exchange still returns one
    second = refreshed(oauth, first["refresh_token"])
    assert "refresh_token" not in second
    assert oauth.api("/sites", second["access_token"]).status_code == 200
    assert oauth.api("/sites", first["access_token"]).status_code == 401
    third = refreshed(oauth, first["refresh_token"])
    assert oauth.api("/sites", third["access_token"]).status_code == 200
