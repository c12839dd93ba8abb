"""Idempotency-Key on every POST: stored responses (success or error) replayed for 24 h,
scoped per application and operator, and what is deliberately not stored."""

from __future__ import annotations

import pytest

from stora_sandbox import ConnectionDropped
from stora_sandbox.store import Store
from tests.sandbox.support import (
    ALL_TEST_SCOPES,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    OTHER_REDIRECT_URI,
    START,
    FakeClock,
    OAuth,
    admin,
    bearer,
    pkce_pair,
)

CONNECTED = "Connected"


@pytest.fixture
def token(oauth: OAuth) -> str:
    return oauth.connect(scope=ALL_TEST_SCOPES)["access_token"]


def event_body(oauth: OAuth, token: str, **extra) -> dict:
    source = oauth.api("/timeline/sources", token).get_json()["sources"][-1]["id"]
    templates = oauth.api("/timeline/templates", token).get_json()["templates"]
    template = next(t["id"] for t in templates if t["name"] == CONNECTED)
    return {
        "source": {"id": source},
        "template": {"id": template},
        "variables": {"app_name": "PartnerApp"},
        **extra,
    }


def post_event(oauth: OAuth, token: str, body: dict, key: str | None):
    headers = bearer(token)
    if key is not None:
        headers["Idempotency-Key"] = key
    return oauth.client.post("/2025-09/timeline/events", json=body, headers=headers)


def recorded(oauth: OAuth, operator: str = "Leeds") -> list[dict]:
    path = f"operators/{oauth.operator_id(operator)}/timeline_events"
    return admin(oauth, "GET", path)["timeline_events"]


def test_success_is_replayed_byte_for_byte(oauth: OAuth, token: str) -> None:
    body = event_body(oauth, token)
    first = post_event(oauth, token, body, "action-1")
    assert first.status_code == 201
    again = post_event(oauth, token, {"anything": "else"}, "action-1")
    assert again.status_code == 201
    assert again.get_data() == first.get_data()
    assert again.headers["X-Request-Id"] != first.headers["X-Request-Id"]
    assert len(recorded(oauth)) == 1
    log = [e for e in admin(oauth, "GET", "requests")["requests"] if e["method"] == "POST"]
    assert [(e["idempotency_key"], e["idempotent_replay"]) for e in log[-2:]] == [
        ("action-1", False),
        ("action-1", True),
    ]
    assert post_event(oauth, token, body, None).status_code == 201
    assert post_event(oauth, token, body, None).status_code == 201  # no key, no replay
    assert len(recorded(oauth)) == 3


def test_errors_are_stored_too(oauth: OAuth, token: str) -> None:
    bad = post_event(oauth, token, {"source": {"id": "tsrc_missing"}}, "action-2")
    assert bad.status_code == 422
    fixed = post_event(oauth, token, event_body(oauth, token), "action-2")
    assert fixed.status_code == 422
    assert fixed.get_data() == bad.get_data()
    assert post_event(oauth, token, event_body(oauth, token), "action-3").status_code == 201


def test_key_reuse_can_be_rejected(oauth: OAuth, token: str) -> None:
    oauth.patch_config(idempotency_key_reuse="reject")
    body = event_body(oauth, token)
    assert post_event(oauth, token, body, "k").status_code == 201
    assert post_event(oauth, token, body, "k").status_code == 201  # same request: replay
    other = post_event(oauth, token, {**body, "description": "changed"}, "k")
    assert other.status_code == 400
    assert other.get_json()["error"]["code"] == "invalid_request"
    assert len(recorded(oauth)) == 1


def test_keys_expire_after_the_ttl(oauth: OAuth, clock: FakeClock) -> None:
    oauth.patch_config(access_token_ttl=200_000)  # outlive the 24 h key window
    token = oauth.connect(scope=ALL_TEST_SCOPES)["access_token"]
    body = event_body(oauth, token)
    first = post_event(oauth, token, body, "k")
    clock.advance(86_399)
    assert post_event(oauth, token, body, "k").get_data() == first.get_data()
    clock.advance(1)
    fresh = post_event(oauth, token, body, "k")
    assert fresh.status_code == 201
    assert fresh.get_json()["event"]["id"] != first.get_json()["event"]["id"]
    assert len(recorded(oauth)) == 2


def _other_client_token(oauth: OAuth) -> str:
    verifier, challenge = pkce_pair()
    code = oauth.code(
        client_id=OTHER_CLIENT_ID,
        redirect_uri=OTHER_REDIRECT_URI,
        scope=ALL_TEST_SCOPES,
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    response = oauth.client.post(
        "/oauth2/token",
        json={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": OTHER_REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": OTHER_CLIENT_ID,
            "client_secret": OTHER_CLIENT_SECRET,
        },
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()["access_token"]


def test_keys_are_scoped_per_application_and_operator(oauth: OAuth, token: str) -> None:
    same_app_same_operator = oauth.connect(scope=ALL_TEST_SCOPES)["access_token"]
    bristol = oauth.connect(operator_id=oauth.operator_id("Bristol"), scope=ALL_TEST_SCOPES)
    other_app = _other_client_token(oauth)
    first = post_event(oauth, token, event_body(oauth, token), "shared-key")
    replay = post_event(oauth, same_app_same_operator, {}, "shared-key")
    assert replay.get_data() == first.get_data()  # a new token of the same connection
    bristol_token = bristol["access_token"]
    elsewhere = post_event(oauth, bristol_token, event_body(oauth, bristol_token), "shared-key")
    assert elsewhere.status_code == 201
    assert elsewhere.get_json()["event"]["id"] != first.get_json()["event"]["id"]
    by_other_app = post_event(oauth, other_app, event_body(oauth, other_app), "shared-key")
    assert by_other_app.status_code == 201
    assert len(recorded(oauth)) == 2
    assert len(recorded(oauth, "Bristol")) == 1


def test_a_key_in_progress_gets_409(oauth: OAuth, token: str, store: Store) -> None:
    identity = ("sandbox-test-client", oauth.operator_id(), "busy")
    assert store.idempotency_begin(identity, "fingerprint") == ("proceed", None)
    busy = post_event(oauth, token, event_body(oauth, token), "busy")
    assert busy.status_code == 409
    assert busy.get_json()["error"]["code"] == "conflict"
    store.idempotency_abandon(identity)
    assert post_event(oauth, token, event_body(oauth, token), "busy").status_code == 201


def test_throttled_and_unauthenticated_requests_store_nothing(
    oauth: OAuth, token: str, clock: FakeClock
) -> None:
    clock.now = (START // 60) * 60 + 0.5
    body = event_body(oauth, token)  # two requests
    oauth.patch_config(rate_limit_per_second=2)
    assert post_event(oauth, "not-a-token", body, "k").status_code == 401
    for _ in range(3):  # the rest of this second's budget, then throttled
        post_event(oauth, token, body, "k")
    assert post_event(oauth, token, body, "k2").status_code == 429
    clock.advance(1)
    assert post_event(oauth, token, body, "k2").status_code == 201


def test_injected_errors_are_stored_only_when_asked(oauth: OAuth, token: str) -> None:
    body = event_body(oauth, token)
    admin(oauth, "POST", "faults", 201, json={"endpoint": "api", "status": 500})
    assert post_event(oauth, token, body, "a").status_code == 500
    assert post_event(oauth, token, body, "a").status_code == 201  # not stored: real retry
    admin(oauth, "POST", "faults", 201, json={"endpoint": "api", "status": 500, "stored": True})
    failed = post_event(oauth, token, body, "b")
    assert failed.status_code == 500
    again = post_event(oauth, token, body, "b")
    assert (again.status_code, again.get_data()) == (500, failed.get_data())
    assert len(recorded(oauth)) == 1


def test_response_lost_after_commit_is_recovered_by_the_key(oauth: OAuth, token: str) -> None:
    body = event_body(oauth, token)
    admin(oauth, "POST", "faults", 201, json={"endpoint": "api", "mode": "drop_after_commit"})
    with pytest.raises(ConnectionDropped):
        post_event(oauth, token, body, "lost")
    retry = post_event(oauth, token, body, "lost")
    assert retry.status_code == 201
    assert [e["id"] for e in recorded(oauth)] == [retry.get_json()["event"]["id"]]


def test_webhook_endpoint_create_replays_its_secret(oauth: OAuth, token: str) -> None:
    body = {
        "name": "sync",
        "api_version": "2025-09",
        "url": "https://hooks.partner.example.com/stora/conn_1",
        "event_types": ["order.created"],
    }
    headers = {**bearer(token), "Idempotency-Key": "create-endpoint-conn_1"}
    first = oauth.client.post("/2025-09/webhook_endpoints", json=body, headers=headers)
    second = oauth.client.post("/2025-09/webhook_endpoints", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.get_json()["endpoint"]["secret"] == first.get_json()["endpoint"]["secret"]
    listing = oauth.api("/webhook_endpoints", token).get_json()
    assert listing["meta"]["pagination"]["count"] == 1


def test_get_and_patch_ignore_the_header(oauth: OAuth, token: str) -> None:
    created = post_event(oauth, token, event_body(oauth, token), None).get_json()["event"]
    headers = {**bearer(token), "Idempotency-Key": "p"}
    path = f"/2025-09/timeline/events/{created['id']}"
    one = oauth.client.patch(path, json={"description": "one"}, headers=headers)
    two = oauth.client.patch(path, json={"description": "two"}, headers=headers)
    assert one.get_json()["event"]["description"] == "one"
    assert two.get_json()["event"]["description"] == "two"
