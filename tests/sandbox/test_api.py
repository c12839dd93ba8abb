"""The /2025-09 API: envelopes, pagination, sorting, filters, scopes and error envelopes."""

from __future__ import annotations

import math
import uuid

import pytest

from tests.sandbox.support import CLIENT_ID, CLIENT_SECRET, FakeClock, OAuth, bearer

# Field names of an order in shared/stora-api/examples/orders-list-response.json.
ORDER_FIELDS = {
    "id", "billing_period", "contact", "contract_template", "coupon", "created_at",
    "email_notifications", "line_items", "metadata", "one_time_total",
    "one_time_total_excluding_tax", "payment_method", "payment_url", "purchase_order_number",
    "site", "source", "starts_at", "status", "subscription", "subtotal", "tax", "tenancy",
    "total", "total_discount", "total_excluding_tax", "updated_at",
}  # fmt: skip
ID_PATTERN = {"site": "site_", "contact": "con_", "order": "order_"}


@pytest.fixture
def token(oauth: OAuth) -> str:
    return oauth.connect(operator_id=oauth.operator_id("Leeds"))["access_token"]


def get(oauth: OAuth, path: str, token: str):
    return oauth.api(path, token)


def assert_meta(body: dict, subdomain: str = "leeds-city-storage") -> None:
    meta = body["meta"]
    uuid.UUID(meta["request_id"])
    assert meta["curies"] == [
        {
            "name": "bo",
            "href": "https://app.stora.test{rel}",
            "templated": True,
            "title": "Backoffice",
        },
        {
            "name": "sf",
            "href": f"https://{subdomain}.stora.test{{rel}}",
            "templated": True,
            "title": "Storefront",
        },
    ]


@pytest.mark.parametrize("kind", ["site", "contact", "order"])
def test_list_and_show_envelopes(oauth: OAuth, token: str, kind: str) -> None:
    listing = get(oauth, f"/{kind}s", token)
    assert listing.status_code == 200
    body = listing.get_json()
    assert list(body) == [f"{kind}s", "meta"]
    assert_meta(body)
    assert listing.headers["X-Request-Id"] == body["meta"]["request_id"]
    first = body[f"{kind}s"][0]
    assert first["id"].startswith(ID_PATTERN[kind])
    assert len(first["id"]) == len(ID_PATTERN[kind]) + 16
    int(first["id"][len(ID_PATTERN[kind]) :], 16)

    single = get(oauth, f"/{kind}s/{first['id']}", token)
    assert single.status_code == 200
    one = single.get_json()
    assert list(one) == [kind, "meta"]
    assert one[kind] == first
    assert "pagination" not in one["meta"]
    assert_meta(one)


def test_order_shape_matches_the_docs_example(oauth: OAuth, token: str) -> None:
    body = get(oauth, "/orders", token).get_json()
    order = body["orders"][0]
    assert set(order) == ORDER_FIELDS
    assert set(order["total"]) == {"amount", "currency", "formatted"}
    assert order["total"]["formatted"].startswith("£")
    assert set(order["site"]) == {"id"}
    assert set(body["meta"]["pagination"]) == {
        "count", "last", "limit", "next", "page", "pages", "prev",
    }  # fmt: skip


def test_site_and_contact_shapes(oauth: OAuth, token: str) -> None:
    site = get(oauth, "/sites", token).get_json()["sites"][0]
    assert set(site) >= {
        "id", "name", "description", "phone", "opened_at", "created_at", "updated_at",
        "directions", "images", "access_hours", "address",
    }  # fmt: skip
    assert set(site["access_hours"]) == {
        "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
    }  # fmt: skip
    contact = get(oauth, "/contacts", token).get_json()["contacts"][0]
    assert set(contact) >= {
        "id", "email", "full_name", "status", "created_at", "updated_at", "address",
        "identity_check", "metadata", "tenancies_count", "type",
    }  # fmt: skip


def test_pagination_walk_covers_every_order_once(oauth: OAuth, token: str, store) -> None:
    leeds = oauth.operator_id("Leeds")
    total = len(store.list_resources("order", leeds))
    assert total == 120
    seen: list[str] = []
    page, pages_visited = 1, 0
    while page is not None:
        body = get(oauth, f"/orders?page={page}&limit=50", token).get_json()
        pagination = body["meta"]["pagination"]
        assert pagination["count"] == total
        assert pagination["limit"] == 50
        assert pagination["page"] == page
        assert pagination["pages"] == pagination["last"] == math.ceil(total / 50) == 3
        assert pagination["prev"] == (page - 1 if page > 1 else None)
        seen.extend(o["id"] for o in body["orders"])
        page = pagination["next"]
        pages_visited += 1
    assert pages_visited == 3
    assert len(seen) == len(set(seen)) == total
    # Default order is newest first.
    created = [o["created_at"] for o in get(oauth, "/orders?limit=100", token).get_json()["orders"]]
    assert created == sorted(created, reverse=True)


def test_last_page_is_partial(oauth: OAuth, token: str) -> None:
    body = get(oauth, "/orders?page=3", token).get_json()
    assert len(body["orders"]) == 20
    assert body["meta"]["pagination"]["next"] is None


def test_page_beyond_the_end_is_empty_or_an_error(oauth: OAuth, token: str) -> None:
    body = get(oauth, "/orders?page=9", token).get_json()
    assert body["orders"] == []
    assert body["meta"]["pagination"]["next"] is None
    assert body["meta"]["pagination"]["prev"] == 3
    oauth.patch_config(page_overflow="error")
    response = get(oauth, "/orders?page=9", token)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "invalid_url_param"


def test_empty_list_has_one_page(oauth: OAuth) -> None:
    created = oauth.client.post("/_sandbox/operators", json={"name": "Empty Storage"}).get_json()
    token = oauth.connect(operator_id=created["id"])["access_token"]
    pagination = get(oauth, "/orders", token).get_json()["meta"]["pagination"]
    assert pagination == {
        "count": 0,
        "last": 1,
        "limit": 50,
        "next": None,
        "page": 1,
        "pages": 1,
        "prev": None,
    }


@pytest.mark.parametrize(
    "query",
    [
        "page=0",
        "page=-1",
        "page=abc",
        "limit=0",
        "limit=101",
        "limit=x",
        "sort_by=name",
        "sort_direction=asc",
        "created_after=yesterday",
        "updated_after=2025-13-01",
    ],
)
def test_bad_url_params_are_422(oauth: OAuth, token: str, query: str) -> None:
    response = get(oauth, f"/orders?{query}", token)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "invalid_url_param"
    assert error["type"] == "invalid_request_error"
    assert error["request_id"] == response.headers["X-Request-Id"]


def test_limit_bounds_are_inclusive(oauth: OAuth, token: str) -> None:
    assert len(get(oauth, "/orders?limit=1", token).get_json()["orders"]) == 1
    assert len(get(oauth, "/orders?limit=100", token).get_json()["orders"]) == 100


def test_sort_and_incremental_filters(oauth: OAuth, token: str) -> None:
    body = get(oauth, "/orders?sort_by=updated_at&sort_direction=ASC&limit=100", token).get_json()
    updated = [o["updated_at"] for o in body["orders"]]
    assert updated == sorted(updated)
    watermark = updated[60]
    after = get(
        oauth, f"/orders?updated_after={watermark}&sort_by=updated_at&sort_direction=ASC", token
    ).get_json()
    assert after["meta"]["pagination"]["count"] == sum(
        1 for u in _all_updated(oauth, token) if u >= watermark
    )
    assert all(o["updated_at"] >= watermark for o in after["orders"])

    created = get(oauth, "/orders?created_after=2025-06-01T00:00:00Z&limit=100", token).get_json()
    assert all(o["created_at"] >= "2025-06-01T00:00:00Z" for o in created["orders"])
    before = get(oauth, "/orders?created_before=2025-06-01&limit=100", token).get_json()
    count_after = created["meta"]["pagination"]["count"]
    assert count_after + before["meta"]["pagination"]["count"] == 120
    with_offset = get(oauth, "/orders?created_after=2025-06-01T01:00:00+01:00", token).get_json()
    assert with_offset["meta"]["pagination"]["count"] == count_after


def _all_updated(oauth: OAuth, token: str) -> list[str]:
    out: list[str] = []
    for page in (1, 2):
        body = get(oauth, f"/orders?limit=100&page={page}", token).get_json()
        out.extend(o["updated_at"] for o in body["orders"])
    return out


def test_contact_filters(oauth: OAuth, token: str) -> None:
    contacts = get(oauth, "/contacts?limit=100", token).get_json()["contacts"]
    target = contacts[3]
    by_email = get(oauth, f"/contacts?email={target['email'].upper()}", token).get_json()
    assert [c["id"] for c in by_email["contacts"]] == [target["id"]]
    leads = get(oauth, "/contacts?status=lead,churned", token).get_json()["contacts"]
    assert leads and all(c["status"] in {"lead", "churned"} for c in leads)
    assert get(oauth, "/contacts?status=vip", token).status_code == 422


def test_operator_isolation(oauth: OAuth, token: str) -> None:
    bristol = oauth.connect(operator_id=oauth.operator_id("Bristol"))["access_token"]
    bristol_orders = get(oauth, "/orders", bristol).get_json()
    assert bristol_orders["meta"]["pagination"]["count"] == 125
    assert_meta(bristol_orders, "bristol-box-rooms")
    other_id = bristol_orders["orders"][0]["id"]
    response = get(oauth, f"/orders/{other_id}", token)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "resource_not_found"


def test_unknown_resource_is_404_resource_not_found(oauth: OAuth, token: str) -> None:
    response = get(oauth, "/sites/site_0000000000000000", token)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "resource_not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/units"), ("GET", "/"), ("POST", "/orders"), ("DELETE", "/sites/x"), ("GET", "/a/b")],
)
def test_unknown_route_is_404_invalid_endpoint(oauth: OAuth, method: str, path: str) -> None:
    response = oauth.client.open(f"/2025-09{path}", method=method)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "invalid_endpoint"


def test_unknown_path_outside_the_api_is_invalid_endpoint(oauth: OAuth) -> None:
    response = oauth.client.get("/2024-01/sites")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "invalid_endpoint"


@pytest.mark.parametrize(
    ("scope", "path"),
    [
        ("public.order:read", "/sites"),
        ("public.site:read", "/contacts"),
        ("public.contact:read", "/orders/order_0000000000000000"),
    ],
)
def test_missing_scope_is_403_forbidden(oauth: OAuth, scope: str, path: str) -> None:
    token = oauth.connect(scope=scope)["access_token"]
    response = get(oauth, path, token)
    assert response.status_code == 403
    error = response.get_json()["error"]
    assert error["code"] == "forbidden"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("not-a-token"), {"Authorization": "Token abc"}, {"Authorization": "Bearer "}],
)
def test_missing_or_invalid_token_is_401_envelope(oauth: OAuth, headers: dict) -> None:
    response = oauth.client.get("/2025-09/orders", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    error = response.get_json()["error"]
    assert error["code"] == "invalid_token"
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-Id"]
    assert {link["kind"] for link in error["links"]} == {"open_api", "documentation"}


def test_expired_and_revoked_tokens_are_401(oauth: OAuth, clock: FakeClock) -> None:
    tokens = oauth.connect()
    clock.advance(7199)
    assert get(oauth, "/sites", tokens["access_token"]).status_code == 200
    clock.advance(1)
    assert get(oauth, "/sites", tokens["access_token"]).status_code == 401
    fresh = oauth.connect()
    oauth.client.post(
        "/oauth2/revoke",
        json={
            "token": fresh["access_token"],
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    assert get(oauth, "/sites", fresh["access_token"]).status_code == 401


def test_every_response_has_a_distinct_request_id(oauth: OAuth, token: str) -> None:
    ids = {get(oauth, "/sites", token).headers["X-Request-Id"] for _ in range(3)}
    ids.add(oauth.client.post("/oauth2/token", json={}).headers["X-Request-Id"])
    assert len(ids) == 4
