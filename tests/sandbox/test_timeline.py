"""Timeline API: sources, templates, creating and updating events, validation, admin view."""

from __future__ import annotations

import uuid

import pytest

from tests.sandbox.support import ALL_TEST_SCOPES, READ_SCOPES, FakeClock, OAuth, admin, bearer

# Keys of the event in shared/stora-api/examples/timeline-event-create-response.json, in order.
EVENT_KEYS = [
    "id", "contact", "created_at", "creator", "description", "external", "invoice", "site",
    "source", "subscription", "template", "tenancy", "unit", "unit_type", "updated_at",
    "variables",
]  # fmt: skip


@pytest.fixture
def token(oauth: OAuth) -> str:
    return oauth.connect(scope=ALL_TEST_SCOPES)["access_token"]


def sources(oauth: OAuth, token: str, query: str = "") -> dict:
    response = oauth.api(f"/timeline/sources{query}", token)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def template_id(oauth: OAuth, token: str, name: str) -> str:
    templates = oauth.api("/timeline/templates", token).get_json()["templates"]
    return next(t["id"] for t in templates if t["name"] == name)


def global_source(oauth: OAuth, token: str) -> str:
    return next(s["id"] for s in sources(oauth, token)["sources"] if s["global"])


def post(oauth: OAuth, token: str, body):
    return oauth.client.post("/2025-09/timeline/events", json=body, headers=bearer(token))


def contact_and_site(oauth: OAuth, token: str) -> tuple[str, str]:
    contact = oauth.api("/contacts?limit=1", token).get_json()["contacts"][0]["id"]
    site = oauth.api("/sites?limit=1", token).get_json()["sites"][0]["id"]
    return contact, site


def test_sources_are_global_plus_the_operators_own(oauth: OAuth, token: str) -> None:
    body = sources(oauth, token)
    listed = body["sources"]
    assert [s["global"] for s in listed].count(True) == 1
    own = [s for s in listed if not s["global"]]
    assert [s["name"] for s in own] == ["Leeds City Storage Ltd CRM"]
    partner = next(s for s in listed if s["global"])
    assert partner["name"] == "Partner platform"
    assert list(partner) == ["id", "created_at", "global", "name", "updated_at", "website_url"]
    assert partner["id"].startswith("tsrc_") and len(partner["id"]) == 21
    assert body["meta"]["pagination"]["count"] == 2
    bristol = oauth.connect(operator_id=oauth.operator_id("Bristol"), scope=ALL_TEST_SCOPES)
    theirs = sources(oauth, bristol["access_token"])["sources"]
    assert partner in theirs  # the same global source, same id
    assert own[0] not in theirs
    page = sources(oauth, token, "?limit=1&page=2&sort_direction=ASC")
    assert page["sources"] == [own[0]]  # created after the global one
    assert page["meta"]["pagination"]["prev"] == 1


def test_seeded_ids_are_stable_across_resets(oauth: OAuth, token: str) -> None:
    before = sources(oauth, token)["sources"]
    admin(oauth, "POST", "reset", json={})
    token = oauth.connect(scope=ALL_TEST_SCOPES)["access_token"]
    assert sources(oauth, token)["sources"] == before


def test_templates_list_and_show(oauth: OAuth, token: str) -> None:
    listing = oauth.api("/timeline/templates", token).get_json()
    names = {t["name"] for t in listing["templates"]}
    assert {"Synced orders", "Connected", "Action performed"} <= names
    synced = next(t for t in listing["templates"] if t["name"] == "Synced orders")
    assert synced["id"].startswith("aetpl_")
    assert synced["global"] is True
    assert synced["variables"] == {"custom": ["order_count"], "predefined": ["site"]}
    assert "{{ order_count }}" in synced["message"]
    shown = oauth.api(f"/timeline/templates/{synced['id']}", token)
    assert shown.status_code == 200
    assert list(shown.get_json()) == ["template", "meta"]
    assert shown.get_json()["template"] == synced
    missing = oauth.api("/timeline/templates/aetpl_0000000000000000", token)
    assert missing.status_code == 404
    assert missing.get_json()["error"]["code"] == "resource_not_found"
    filtered = oauth.api("/timeline/templates?created_after=2030-01-01", token).get_json()
    assert filtered["templates"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/timeline/sources"),
        ("GET", "/timeline/templates"),
        ("POST", "/timeline/events"),
        ("PATCH", "/timeline/events/aevt_x"),
    ],
)
def test_scopes_are_enforced(oauth: OAuth, method: str, path: str) -> None:
    token = oauth.connect(scope=READ_SCOPES)["access_token"]
    response = oauth.client.open(f"/2025-09{path}", method=method, json={}, headers=bearer(token))
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"


def test_create_event_like_the_docs_example(oauth: OAuth, token: str, clock: FakeClock) -> None:
    contact, site = contact_and_site(oauth, token)
    body = {
        "source": {"id": global_source(oauth, token)},
        "template": {"id": template_id(oauth, token, "Action performed")},
        "contact": {"id": contact},
        "site": {"id": site},
        "description": "Access code issued via PartnerApp",
        "external": {"id": "pa_action_48213", "url": "https://app.partner.example.com/a/48213"},
        "variables": {"action_name": "Access code issued"},
    }
    response = post(oauth, token, body)
    assert response.status_code == 201, response.get_json()
    payload = response.get_json()
    assert list(payload) == ["event", "meta"]
    uuid.UUID(payload["meta"]["request_id"])
    event = payload["event"]
    assert list(event) == EVENT_KEYS
    assert event["id"].startswith("aevt_")
    assert event["creator"]["id"].startswith("app_")
    for key in ("source", "template", "contact", "site", "description", "external", "variables"):
        assert event[key] == body[key]
    for key in ("invoice", "subscription", "tenancy", "unit", "unit_type"):
        assert event[key] is None
    assert event["created_at"] == event["updated_at"]
    recorded = admin(oauth, "GET", f"operators/{oauth.operator_id()}/timeline_events")
    (item,) = recorded["timeline_events"]
    assert {k: v for k, v in item.items() if k != "sandbox"} == event
    full_name = oauth.api(f"/contacts/{contact}", token).get_json()["contact"]["full_name"]
    assert item["sandbox"] == {
        "client_id": "sandbox-test-client",
        "message": f"Access code issued for {full_name}.",
    }


def test_minimal_event_and_operator_source(oauth: OAuth, token: str) -> None:
    own = next(s["id"] for s in sources(oauth, token)["sources"] if not s["global"])
    response = post(
        oauth,
        token,
        {"source": {"id": own}, "template": {"id": template_id(oauth, token, "Connected")}},
    )
    assert response.status_code == 201
    assert response.get_json()["event"]["variables"] == {}
    assert response.get_json()["event"]["external"] is None


@pytest.mark.parametrize(
    ("body", "pointers"),
    [
        ({}, ["/source", "/template"]),
        ({"source": "tsrc_1", "template": {"id": ""}}, ["/source", "/template/id"]),
        (
            {"source": {"id": "tsrc_nope"}, "template": {"id": "aetpl_nope"}},
            ["/source/id", "/template/id"],
        ),
        ({"contact": {"id": "site_1"}, "unit": {"id": 5}}, ["/contact/id", "/unit/id"]),
        ({"contact": {"id": "con_0000000000000000"}}, ["/contact/id"]),
        ({"external": {"url": "ftp://x"}}, ["/external/id", "/external/url"]),
        ({"external": "pa_1"}, ["/external"]),
        ({"variables": []}, ["/variables"]),
        ({"variables": {"deep": {"x": 1}}}, ["/variables/deep"]),
        ({"description": 7}, ["/description"]),
        ({"extrenal": {"id": "typo"}}, ["/extrenal"]),
        ({"source": {"id": "tsrc_1", "name": "x"}}, ["/source/id", "/source/name"]),
    ],
)
def test_invalid_bodies_list_every_problem(
    oauth: OAuth, token: str, body: dict, pointers: list[str]
) -> None:
    base = {
        "source": {"id": global_source(oauth, token)},
        "template": {"id": template_id(oauth, token, "Connected")},
    }
    complete = body if body == {} else {**base, **body}
    response = post(oauth, token, complete)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "invalid_content"
    assert error["message"] == "The request body content is not valid."
    assert list(error) == ["code", "details", "links", "message", "request_id", "type"]
    found = [d["pointer"] for d in error["details"]]
    assert sorted(found) == sorted(pointers)
    assert all(d["message"].startswith(f"value at `{d['pointer']}` ") for d in error["details"])


def test_unknown_fields_can_be_allowed(oauth: OAuth, token: str) -> None:
    oauth.patch_config(reject_unknown_fields=False)
    body = {
        "source": {"id": global_source(oauth, token)},
        "template": {"id": template_id(oauth, token, "Connected")},
        "future_field": True,
    }
    response = post(oauth, token, body)
    assert response.status_code == 201
    assert "future_field" not in response.get_json()["event"]


def test_predefined_variables_require_their_records(oauth: OAuth, token: str) -> None:
    body = {
        "source": {"id": global_source(oauth, token)},
        "template": {"id": template_id(oauth, token, "Synced orders")},
        "variables": {"order_count": 3},
    }
    missing = post(oauth, token, body)
    assert missing.status_code == 422
    assert [d["pointer"] for d in missing.get_json()["error"]["details"]] == ["/site"]
    _contact, site = contact_and_site(oauth, token)
    assert post(oauth, token, {**body, "site": {"id": site}}).status_code == 201


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [(b"[1, 2]", "application/json"), (b"{nope", "application/json"), (b"a=b", "text/plain")],
)
def test_malformed_bodies_are_400(oauth: OAuth, token: str, raw: bytes, content_type: str) -> None:
    response = oauth.client.post(
        "/2025-09/timeline/events",
        data=raw,
        headers={**bearer(token), "Content-Type": content_type},
    )
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"


def test_patch_event(oauth: OAuth, token: str, clock: FakeClock) -> None:
    source = global_source(oauth, token)
    created = post(
        oauth,
        token,
        {
            "source": {"id": source},
            "template": {"id": template_id(oauth, token, "Connected")},
            "variables": {"app_name": "A", "stage": "lead"},
            "description": "deal",
        },
    ).get_json()["event"]
    clock.advance(90)
    path = f"/2025-09/timeline/events/{created['id']}"
    patched = oauth.client.patch(
        path, json={"variables": {"app_name": "A", "stage": "won"}}, headers=bearer(token)
    )
    assert patched.status_code == 200
    event = patched.get_json()["event"]
    assert event["variables"] == {"app_name": "A", "stage": "won"}
    assert event["description"] == "deal"
    assert event["created_at"] == created["created_at"]
    assert event["updated_at"] > created["updated_at"]
    bad = oauth.client.patch(path, json={"source": None}, headers=bearer(token))
    assert bad.status_code == 422
    assert bad.get_json()["error"]["details"][0]["pointer"] == "/source"
    events = admin(oauth, "GET", f"operators/{oauth.operator_id()}/timeline_events")
    assert [e["variables"]["stage"] for e in events["timeline_events"]] == ["won"]
    bristol = oauth.connect(operator_id=oauth.operator_id("Bristol"), scope=ALL_TEST_SCOPES)
    foreign = oauth.client.patch(path, json={}, headers=bearer(bristol["access_token"]))
    assert foreign.status_code == 404
    assert foreign.get_json()["error"]["code"] == "resource_not_found"
