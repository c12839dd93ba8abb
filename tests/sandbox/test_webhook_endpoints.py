"""Webhook Endpoints API: create (secret once), list/show/update/disable/enable, filters,
URL and event-type validation, scopes and operator isolation."""

from __future__ import annotations

import json
import re

import pytest

from tests.sandbox.support import ALL_TEST_SCOPES, READ_SCOPES, FakeClock, OAuth, admin, bearer

# Keys of the endpoint in shared/stora-api/examples/webhook-endpoint-create-response.json.
ENDPOINT_KEYS = [
    "id", "api_version", "created_at", "creator", "description", "disabled_at", "event_types",
    "metadata", "name", "secret", "status", "updated_at", "url",
]  # fmt: skip
EXAMPLE_REQUEST = {
    "name": "PartnerApp order sync",
    "api_version": "2025-09",
    "url": "https://hooks.partner.example.com/stora/webhooks/conn_8f2a61d0",
    "event_types": ["order.created", "contact.updated"],
    "description": "Created by PartnerApp for this operator connection",
    "metadata": {"partner_connection_id": "conn_8f2a61d0", "managed_by": "partnerapp"},
}


@pytest.fixture
def token(oauth: OAuth) -> str:
    return oauth.connect(scope=ALL_TEST_SCOPES)["access_token"]


def create(oauth: OAuth, token: str, **overrides):
    body = {**EXAMPLE_REQUEST, **overrides}
    return oauth.client.post("/2025-09/webhook_endpoints", json=body, headers=bearer(token))


def call(oauth: OAuth, method: str, path: str, token: str, body=None):
    return oauth.client.open(
        f"/2025-09/webhook_endpoints{path}", method=method, json=body, headers=bearer(token)
    )


def test_create_returns_the_secret_once(oauth: OAuth, token: str) -> None:
    response = create(oauth, token)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert list(body) == ["endpoint", "meta"]
    endpoint = body["endpoint"]
    assert list(endpoint) == ENDPOINT_KEYS
    assert re.fullmatch(r"we_[0-9a-f]{16}", endpoint["id"])
    assert re.fullmatch(r"[0-9a-f]{64}", endpoint["secret"])
    assert endpoint["creator"]["id"].startswith("app_")
    assert (endpoint["status"], endpoint["disabled_at"]) == ("enabled", None)
    for key in ("name", "api_version", "url", "event_types", "description", "metadata"):
        assert endpoint[key] == EXAMPLE_REQUEST[key]
    shown = call(oauth, "GET", f"/{endpoint['id']}", token).get_json()
    assert shown["endpoint"] == {**endpoint, "secret": None}
    listed = call(oauth, "GET", "", token).get_json()
    assert listed["endpoints"] == [{**endpoint, "secret": None}]
    assert listed["meta"]["pagination"]["count"] == 1
    other = create(oauth, token).get_json()["endpoint"]
    assert other["secret"] != endpoint["secret"]
    # The admin view shows secrets (for secret-canary tests), with sandbox details.
    (seen, _second) = admin(oauth, "GET", f"webhook_endpoints?operator_id={oauth.operator_id()}")[
        "webhook_endpoints"
    ]
    assert seen["secret"] == endpoint["secret"]
    assert seen["sandbox"]["consecutive_failures"] == 0


@pytest.mark.parametrize(
    ("overrides", "pointers"),
    [
        ({"url": "http://hooks.partner.example.com/x"}, ["/url"]),
        ({"url": "hooks.partner.example.com"}, ["/url"]),
        ({"url": "https://"}, ["/url"]),
        ({"url": 5}, ["/url"]),
        ({"event_types": []}, ["/event_types"]),
        ({"event_types": ["order.created", "order.exploded"]}, ["/event_types/1"]),
        ({"event_types": ["order.created", "order.created"]}, ["/event_types/1"]),
        ({"api_version": "2024-01"}, ["/api_version"]),
        ({"name": ""}, ["/name"]),
        ({"metadata": {"nested": {"a": 1}}}, ["/metadata/nested"]),
        ({"metadata": []}, ["/metadata"]),
        ({"description": 1}, ["/description"]),
        ({"secret": "mine"}, ["/secret"]),
    ],
)
def test_create_validation(oauth: OAuth, token: str, overrides: dict, pointers: list) -> None:
    response = create(oauth, token, **overrides)
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_content"
    assert [d["pointer"] for d in error["details"]] == pointers


def test_required_fields(oauth: OAuth, token: str) -> None:
    response = oauth.client.post("/2025-09/webhook_endpoints", json={}, headers=bearer(token))
    pointers = [d["pointer"] for d in response.get_json()["error"]["details"]]
    assert pointers == ["/name", "/api_version", "/url", "/event_types"]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8123/hooks", "http://localhost/hooks", "http://[::1]:9000/h"],
)
def test_http_is_allowed_for_loopback_only_when_switched_on(
    oauth: OAuth, token: str, url: str
) -> None:
    assert create(oauth, token, url=url).status_code == 201
    oauth.patch_config(allow_http_loopback_webhooks=False)
    assert create(oauth, token, url=url).status_code == 422


def test_update(oauth: OAuth, token: str, clock: FakeClock) -> None:
    endpoint = create(oauth, token).get_json()["endpoint"]
    clock.advance(30)
    changes = {
        "name": "Renamed",
        "description": None,
        "url": "https://hooks.partner.example.com/v2",
        "event_types": ["contact.created"],
        "metadata": {"partner_connection_id": "conn_2"},
    }
    response = call(oauth, "PATCH", f"/{endpoint['id']}", token, changes)
    assert response.status_code == 200
    updated = response.get_json()["endpoint"]
    assert updated["secret"] is None
    for key, value in changes.items():
        assert updated[key] == value
    assert updated["updated_at"] > endpoint["updated_at"]
    assert updated["created_at"] == endpoint["created_at"]
    bad = call(oauth, "PATCH", f"/{endpoint['id']}", token, {"url": "ftp://x", "event_types": 1})
    assert bad.status_code == 422
    assert [d["pointer"] for d in bad.get_json()["error"]["details"]] == ["/url", "/event_types"]


def test_disable_and_enable(oauth: OAuth, token: str, clock: FakeClock) -> None:
    endpoint = create(oauth, token).get_json()["endpoint"]
    clock.advance(10)
    disabled = call(oauth, "POST", f"/{endpoint['id']}/disable", token)
    assert disabled.status_code == 200
    body = disabled.get_json()["endpoint"]
    assert body["status"] == "disabled"
    assert body["disabled_at"] == body["updated_at"] != endpoint["updated_at"]
    assert body["secret"] is None
    clock.advance(10)
    again = call(oauth, "POST", f"/{endpoint['id']}/disable", token).get_json()["endpoint"]
    assert again["disabled_at"] == body["disabled_at"]  # disabling twice keeps the time
    hidden = call(oauth, "POST", f"/{endpoint['id']}/enable", token)
    assert hidden.status_code == 404
    assert hidden.get_json()["error"]["code"] == "invalid_endpoint"
    oauth.patch_config(webhook_enable_endpoint=True)
    enabled = call(oauth, "POST", f"/{endpoint['id']}/enable", token).get_json()["endpoint"]
    assert (enabled["status"], enabled["disabled_at"]) == ("enabled", None)


def test_list_filters(oauth: OAuth, token: str, clock: FakeClock) -> None:
    first = create(oauth, token, metadata={"conn": "a", "n": 1}).get_json()["endpoint"]
    clock.advance(1)
    second = create(oauth, token, metadata={"conn": "b", "flag": True}).get_json()["endpoint"]
    call(oauth, "POST", f"/{second['id']}/disable", token)

    def ids(query: str) -> list[str]:
        clock.advance(1)  # stay under 10 requests per second for this token
        response = call(oauth, "GET", query, token)
        assert response.status_code == 200, response.get_json()
        return [e["id"] for e in response.get_json()["endpoints"]]

    assert ids("") == [second["id"], first["id"]]  # created_at DESC
    assert ids("?sort_direction=ASC") == [first["id"], second["id"]]
    assert ids("?status=enabled") == [first["id"]]
    assert ids("?status=enabled,disabled") == [second["id"], first["id"]]
    assert ids("?metadata[conn]=a") == [first["id"]]
    assert ids("?metadata[conn]=a&metadata[n]=1") == [first["id"]]
    assert ids("?metadata[flag]=true") == [second["id"]]
    assert ids("?metadata[conn]=c") == []
    assert ids("?metadata=" + json.dumps({"conn": "b"})) == [second["id"]]
    assert ids("?limit=1&page=2") == [first["id"]]
    for bad in ("?status=paused", "?metadata=notjson", "?sort_by=updated_at", "?limit=101"):
        clock.advance(1)
        response = call(oauth, "GET", bad, token)
        assert response.status_code == 422
        assert response.get_json()["error"]["code"] == "invalid_url_param"


def test_operator_isolation_and_unknown_ids(oauth: OAuth, token: str) -> None:
    endpoint = create(oauth, token).get_json()["endpoint"]
    bristol = oauth.connect(operator_id=oauth.operator_id("Bristol"), scope=ALL_TEST_SCOPES)
    theirs = bristol["access_token"]
    assert call(oauth, "GET", "", theirs).get_json()["endpoints"] == []
    for method, path in [
        ("GET", f"/{endpoint['id']}"),
        ("PATCH", f"/{endpoint['id']}"),
        ("POST", f"/{endpoint['id']}/disable"),
        ("GET", "/we_0000000000000000"),
    ]:
        response = call(oauth, method, path, theirs, {} if method != "GET" else None)
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "resource_not_found"


def test_scopes(oauth: OAuth) -> None:
    read_only = oauth.connect(scope=f"{READ_SCOPES} public.webhook_endpoint:read")
    token = read_only["access_token"]
    assert call(oauth, "GET", "", token).status_code == 200
    assert create(oauth, token).status_code == 403
    none = oauth.connect(scope=READ_SCOPES)["access_token"]
    assert call(oauth, "GET", "", none).status_code == 403
