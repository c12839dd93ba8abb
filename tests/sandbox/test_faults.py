"""Fault injection through /_sandbox/faults, in-process (see test_server.py for sockets)."""

from __future__ import annotations

import time

import pytest

from stora_sandbox import ConnectionDropped
from tests.sandbox.support import OAuth, bearer


def add_fault(oauth: OAuth, **spec) -> dict:
    response = oauth.client.post("/_sandbox/faults", json=spec)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def live_rows(oauth: OAuth) -> int:
    return len(oauth.store.token_rows)


def test_status_fault_with_body_and_headers_replaces_processing(oauth: OAuth) -> None:
    tokens = oauth.connect()
    rows = live_rows(oauth)
    add_fault(
        oauth,
        endpoint="token",
        status=429,
        body={"error": {"code": "too_many_requests"}},
        headers={"Retry-After": "3", "RateLimit-Reset": "1760432460"},
    )
    response = oauth.refresh(tokens["refresh_token"])
    assert response.status_code == 429
    assert response.get_json() == {"error": {"code": "too_many_requests"}}
    assert response.headers["Retry-After"] == "3"
    assert live_rows(oauth) == rows  # nothing was issued
    # One-shot by default: the retry goes through.
    assert oauth.refresh(tokens["refresh_token"]).status_code == 200


def test_status_only_faults_get_plausible_bodies(oauth: OAuth) -> None:
    token = oauth.connect()["access_token"]
    add_fault(oauth, endpoint="api", status=503)
    api = oauth.api("/sites", token)
    assert api.status_code == 503
    assert api.get_json()["error"]["code"] == "internal_server_error"
    assert api.get_json()["error"]["request_id"] == api.headers["X-Request-Id"]
    add_fault(oauth, endpoint="api", status=429)
    assert oauth.api("/sites", token).get_json()["error"]["code"] == "too_many_requests"
    add_fault(oauth, endpoint="token", status=502)
    oauth_error = oauth.refresh("whatever")
    assert oauth_error.status_code == 502
    assert oauth_error.get_json()["error"] == "server_error"


def test_grant_type_filter_and_count(oauth: OAuth) -> None:
    add_fault(oauth, endpoint="token", grant_type="refresh_token", status=500, count=2)
    tokens = oauth.connect()  # authorization_code passes
    assert oauth.refresh(tokens["refresh_token"]).status_code == 500
    assert oauth.refresh(tokens["refresh_token"]).status_code == 500
    assert oauth.refresh(tokens["refresh_token"]).status_code == 200
    assert oauth.client.get("/_sandbox/faults").get_json() == {"faults": []}


def test_forever_fault_until_cleared(oauth: OAuth) -> None:
    token = oauth.connect()["access_token"]
    fault = add_fault(oauth, endpoint="api", status=500, count=-1)
    for _ in range(3):
        assert oauth.api("/orders", token).status_code == 500
    listed = oauth.client.get("/_sandbox/faults").get_json()["faults"]
    assert listed[0]["id"] == fault["id"] and listed[0]["hits"] == 3
    oauth.client.delete("/_sandbox/faults")
    assert oauth.api("/orders", token).status_code == 200


def test_fault_matches_only_its_endpoint(oauth: OAuth) -> None:
    add_fault(oauth, endpoint="revoke", status=500)
    tokens = oauth.connect()
    info = oauth.client.get("/oauth2/token/info", headers=bearer(tokens["access_token"]))
    assert info.status_code == 200
    assert len(oauth.client.get("/_sandbox/faults").get_json()["faults"]) == 1


def test_latency_fault_and_global_latency(oauth: OAuth) -> None:
    token = oauth.connect()["access_token"]
    add_fault(oauth, endpoint="api", latency_ms=150)
    started = time.perf_counter()
    assert oauth.api("/sites", token).status_code == 200
    assert time.perf_counter() - started >= 0.15
    oauth.patch_config(latency_ms=100)
    started = time.perf_counter()
    oauth.api("/sites", token)
    assert time.perf_counter() - started >= 0.1
    started = time.perf_counter()
    oauth.client.get("/_sandbox/config")  # admin calls are never delayed
    assert time.perf_counter() - started < 0.1


def test_drop_before_commit_issues_nothing(oauth: OAuth) -> None:
    tokens = oauth.connect()
    rows = live_rows(oauth)
    add_fault(oauth, endpoint="token", mode="drop_before_commit")
    with pytest.raises(ConnectionDropped):
        oauth.refresh(tokens["refresh_token"])
    assert live_rows(oauth) == rows
    entry = oauth.client.get("/_sandbox/requests").get_json()["requests"][-1]
    assert entry["status"] is None and entry["dropped"] is True


def test_drop_after_commit_rotates_then_drops(oauth: OAuth) -> None:
    tokens = oauth.connect()
    rows = live_rows(oauth)
    add_fault(oauth, endpoint="token", mode="drop_after_commit", grant_type="refresh_token")
    with pytest.raises(ConnectionDropped):
        oauth.refresh(tokens["refresh_token"])
    assert live_rows(oauth) == rows + 1
    # on_use mode: the lost pair is orphaned and the retry with the old token succeeds.
    assert oauth.refresh(tokens["refresh_token"]).status_code == 200


def test_drop_after_commit_in_immediate_mode_loses_the_connection(oauth: OAuth) -> None:
    oauth.patch_config(revocation_mode="immediate")
    tokens = oauth.connect()
    add_fault(oauth, endpoint="token", mode="drop_after_commit")
    with pytest.raises(ConnectionDropped):
        oauth.refresh(tokens["refresh_token"])
    assert oauth.refresh(tokens["refresh_token"]).get_json()["error"] == "invalid_grant"


def test_drop_after_commit_on_api_still_counts_as_use(oauth: OAuth) -> None:
    first = oauth.connect()
    second = oauth.refresh(first["refresh_token"]).get_json()
    add_fault(oauth, endpoint="api", mode="drop_after_commit")
    with pytest.raises(ConnectionDropped):
        oauth.api("/sites", second["access_token"])
    assert oauth.refresh(first["refresh_token"]).get_json()["error"] == "invalid_grant"


def test_malformed_json_after_commit(oauth: OAuth) -> None:
    tokens = oauth.connect()
    rows = live_rows(oauth)
    add_fault(oauth, endpoint="token", mode="malformed_json")
    response = oauth.refresh(tokens["refresh_token"])
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json(silent=True) is None
    assert live_rows(oauth) == rows + 1
    body = response.get_data(as_text=True)
    assert all(
        t["value"] not in body for t in oauth.client.get("/_sandbox/tokens").get_json()["tokens"]
    )


def test_latency_after_commit_and_extra_headers_decorate_the_real_response(oauth: OAuth) -> None:
    token = oauth.connect()["access_token"]
    add_fault(oauth, endpoint="api", latency_after_commit_ms=100, headers={"RateLimit-Limit": "60"})
    started = time.perf_counter()
    response = oauth.api("/sites", token)
    assert time.perf_counter() - started >= 0.1
    assert response.status_code == 200
    assert response.headers["RateLimit-Limit"] == "60"
    assert response.get_json()["sites"]


def test_authorize_fault(oauth: OAuth) -> None:
    add_fault(oauth, endpoint="authorize", status=503)
    assert oauth.decide().status_code == 503
    assert oauth.decide().status_code == 302


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"endpoint": "nowhere"},
        {"endpoint": "token", "status": 700},
        {"endpoint": "token", "status": "500"},
        {"endpoint": "token", "mode": "explode"},
        {"endpoint": "token", "count": 0},
        {"endpoint": "token", "latency_ms": -1},
        {"endpoint": "token", "headers": ["x"]},
        {"endpoint": "token", "surprise": 1},
    ],
)
def test_fault_validation(oauth: OAuth, spec: dict) -> None:
    response = oauth.client.post("/_sandbox/faults", json=spec)
    assert response.status_code == 400
    assert "error" in response.get_json()
