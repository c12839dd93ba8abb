"""The /_sandbox admin API: operators and records, token controls, config, logs, reset."""

from __future__ import annotations

import json
import logging

import pytest

from stora_sandbox import SandboxConfig, create_app
from tests.sandbox.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    REDIRECT_URI,
    FakeClock,
    OAuth,
    admin,
    bearer,
)


def test_index_and_health(oauth: OAuth) -> None:
    index = admin(oauth, "GET", "")
    assert index["token_url"] == "http://localhost/oauth2/token"
    assert index["api_base_url"] == "http://localhost/2025-09"
    assert admin(oauth, "GET", "health") == {"ok": True}


def test_demo_seed_operators(oauth: OAuth) -> None:
    operators = admin(oauth, "GET", "operators")["operators"]
    assert [(o["name"], o["subdomain"]) for o in operators] == [
        ("Leeds City Storage Ltd", "leeds-city-storage"),
        ("Bristol Box Rooms", "bristol-box-rooms"),
        ("Camden Self Store", "camden-self-store"),
    ]
    for operator in operators:
        assert 2 <= operator["sites"] <= 3
        assert 18 <= operator["contacts"] <= 22
        assert 115 <= operator["orders"] <= 125
        assert operator["id"].startswith("opr_")


def test_demo_seed_is_deterministic() -> None:
    def snapshot() -> list:
        store = create_app(SandboxConfig(seed="demo")).extensions["stora_sandbox"]
        return [
            (r.id, r.data["created_at"])
            for kind in ("site", "contact", "order")
            for r in store.resources[kind].values()
        ] + [o.id for o in store.list_operators()]

    assert snapshot() == snapshot()


def test_create_operator_with_generated_records(oauth: OAuth) -> None:
    created = admin(
        oauth,
        "POST",
        "operators",
        201,
        json={"name": "Manchester Lockers", "sites": 2, "contacts": 5, "orders": 7},
    )
    assert created["subdomain"] == "manchester-lockers"
    assert (created["sites"], created["contacts"], created["orders"]) == (2, 5, 7)
    assert admin(oauth, "GET", f"operators/{created['id']}") == created
    token = oauth.connect(operator_id=created["id"])["access_token"]
    body = oauth.api("/orders", token).get_json()
    assert body["meta"]["pagination"]["count"] == 7
    assert body["meta"]["curies"][1]["href"] == "https://manchester-lockers.stora.test{rel}"
    info = oauth.client.get("/oauth2/token/info", headers=bearer(token)).get_json()
    assert info["operator"]["name"] == "Manchester Lockers"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"name": ""}, 400),
        ({"name": "X", "subdomain": "Bad Sub"}, 400),
        ({"name": "X", "orders": -1}, 400),
        ({"name": "X", "orders": "3"}, 400),
        ({"name": "Leeds again", "subdomain": "leeds-city-storage"}, 409),
    ],
)
def test_create_operator_validation(oauth: OAuth, body: dict, status: int) -> None:
    assert "error" in admin(oauth, "POST", "operators", status, json=body)


def test_unknown_operator_is_404(oauth: OAuth) -> None:
    for method, path in [
        ("GET", "operators/opr_x"),
        ("POST", "operators/opr_x/orders"),
        ("POST", "operators/opr_x/expire_access_tokens"),
        ("POST", "operators/opr_x/revoke_tokens"),
    ]:
        admin(oauth, method, path, 404)


def test_create_orders_now_with_fields(oauth: OAuth, clock: FakeClock) -> None:
    leeds = oauth.operator_id("Leeds")
    token = oauth.connect(operator_id=leeds)["access_token"]
    clock.advance(3600)
    created = admin(
        oauth,
        "POST",
        f"operators/{leeds}/orders",
        201,
        json={"count": 3, "fields": {"status": "draft", "metadata": {"k": "v"}}},
    )["orders"]
    assert len(created) == 3
    assert all(o["status"] == "draft" and o["metadata"] == {"k": "v"} for o in created)
    newest = oauth.api("/orders?limit=3", token).get_json()
    assert newest["meta"]["pagination"]["count"] == 123
    assert {o["id"] for o in newest["orders"]} == {o["id"] for o in created}
    # Seeded orders are in 2025; the new ones carry the sandbox clock's time.
    since = created[0]["created_at"]
    assert (
        oauth.api(f"/orders?created_after={since}", token).get_json()["orders"]
        == (newest["orders"])
    )


def test_create_orders_validation(oauth: OAuth) -> None:
    leeds = oauth.operator_id("Leeds")
    admin(oauth, "POST", f"operators/{leeds}/orders", 400, json={"count": "two"})
    admin(oauth, "POST", f"operators/{leeds}/orders", 400, json={"fields": []})
    admin(oauth, "POST", f"operators/{leeds}/orders", 400, json={"fields": {"created_at": "soon"}})
    assert admin(oauth, "GET", f"operators/{leeds}")["orders"] == 120


def test_patch_order_bumps_updated_at(oauth: OAuth, clock: FakeClock) -> None:
    token = oauth.connect()["access_token"]
    order = oauth.api("/orders?limit=1", token).get_json()["orders"][0]
    clock.advance(60)
    patched = admin(oauth, "PATCH", f"orders/{order['id']}", json={"status": "cancelled"})
    assert patched["order"]["status"] == "cancelled"
    assert patched["order"]["updated_at"] > order["updated_at"]
    changed = oauth.api(f"/orders?updated_after={patched['order']['updated_at']}", token)
    assert [o["id"] for o in changed.get_json()["orders"]] == [order["id"]]
    admin(oauth, "PATCH", "orders/order_missing", 404, json={})


def test_expire_access_tokens_forces_a_refresh(oauth: OAuth) -> None:
    leeds = oauth.operator_id("Leeds")
    tokens = oauth.connect(operator_id=leeds)
    other = oauth.connect(operator_id=oauth.operator_id("Bristol"))
    assert admin(oauth, "POST", f"operators/{leeds}/expire_access_tokens") == {"expired": 1}
    assert oauth.api("/sites", tokens["access_token"]).status_code == 401
    assert oauth.api("/sites", other["access_token"]).status_code == 200
    fresh = oauth.refresh(tokens["refresh_token"]).get_json()
    assert oauth.api("/sites", fresh["access_token"]).status_code == 200


def test_revoke_tokens_disconnects_the_operator(oauth: OAuth) -> None:
    leeds = oauth.operator_id("Leeds")
    tokens = oauth.connect(operator_id=leeds)
    pending_code = oauth.code(operator_id=leeds)
    assert admin(oauth, "POST", f"operators/{leeds}/revoke_tokens") == {"revoked": 1}
    assert oauth.api("/sites", tokens["access_token"]).status_code == 401
    assert oauth.refresh(tokens["refresh_token"]).get_json()["error"] == "invalid_grant"
    assert oauth.exchange(pending_code).get_json()["error"] == "invalid_grant"


def test_config_get_patch_and_validation(oauth: OAuth) -> None:
    config = admin(oauth, "GET", "config")
    assert config == {
        "access_token_ttl": 7200,
        "code_ttl": 600,
        "revocation_mode": "on_use",
        "force_pkce": False,
        "pkce_methods": "S256 plain",
        "token_info_operator_id": False,
        "token_info_expires_in": "absolute",
        "omit_refresh_token_on_refresh": False,
        "omit_expires_in": False,
        "latency_ms": 0,
        "default_scopes": "",
        "page_overflow": "empty",
        "rate_limit_per_second": 10,
        "rate_limit_per_minute": 60,
        "rate_limit_key": "token",
        "rate_limit_window": "fixed",
        "rate_limit_retry_after": False,
        "rate_limit_headers_on_success": False,
        "rate_limit_token_endpoint": False,
        "idempotency_ttl": 86400,
        "idempotency_key_reuse": "replay",
        "reject_unknown_fields": True,
        "allow_http_loopback_webhooks": True,
        "webhook_enable_endpoint": False,
        "webhook_time_factor": 1.0,
        "webhook_timeout_s": 10.0,
        "webhook_max_retries": 6,
        "webhook_resign_retries": True,
        "webhook_duplicate_rate": 0.0,
        "webhook_shuffle": False,
        "webhook_auto_disable_after": 0,
    }
    patched = admin(oauth, "PATCH", "config", json={"revocation_mode": "immediate"})
    assert patched["revocation_mode"] == "immediate"
    # Whole numbers are accepted for float switches and stored as floats.
    assert (
        admin(oauth, "PATCH", "config", json={"webhook_time_factor": 2})["webhook_time_factor"]
        == 2.0
    )
    for bad in [
        {"nope": 1},
        {"revocation_mode": "sometimes"},
        {"access_token_ttl": "60"},
        {"access_token_ttl": 0},
        {"force_pkce": 1},
        {"latency_ms": -5},
        {"pkce_methods": "S256 S512"},
        {"default_scopes": "public.everything"},
        {"revocation_mode": "on_use", "bogus": True},
        {"rate_limit_window": "rolling"},
        {"webhook_duplicate_rate": 1.5},
        {"webhook_time_factor": True},
        {"webhook_time_factor": "fast"},
        {"webhook_timeout_s": 0},
        {"webhook_max_retries": 21},
        {"idempotency_key_reuse": "ignore"},
    ]:
        assert "error" in admin(oauth, "PATCH", "config", 400, json=bad)
    assert admin(oauth, "GET", "config")["revocation_mode"] == "immediate"


def test_applications_upsert_and_list_never_show_secrets(oauth: OAuth) -> None:
    created = admin(
        oauth,
        "POST",
        "applications",
        201,
        json={"client_id": "new", "client_secret": "new-secret", "redirect_uris": ["http://x/cb"]},
    )
    assert created["client_id"] == "new"
    replaced = admin(
        oauth,
        "POST",
        "applications",
        200,
        json={
            "client_id": "new",
            "client_secret": "s2",
            "redirect_uris": ["http://y/cb"],
            "name": "New App",
        },
    )
    assert replaced["redirect_uris"] == ["http://y/cb"]
    listing = admin(oauth, "GET", "applications")
    assert "new-secret" not in json.dumps(listing) and "s2" not in json.dumps(listing)
    assert CLIENT_SECRET not in json.dumps(listing)
    admin(oauth, "POST", "applications", 400, json={"client_id": "x"})
    admin(
        oauth,
        "POST",
        "applications",
        400,
        json={"client_id": "x", "client_secret": "y", "redirect_uris": "http://x"},
    )


def test_request_log_fields_and_no_secrets(oauth: OAuth, caplog) -> None:
    caplog.set_level(logging.INFO, logger="stora_sandbox.requests")
    leeds = oauth.operator_id("Leeds")
    tokens = oauth.connect(operator_id=leeds)
    refreshed = oauth.refresh(tokens["refresh_token"]).get_json()
    oauth.client.get("/oauth2/token/info", headers=bearer(refreshed["access_token"]))
    oauth.api("/orders?page=2&limit=10", refreshed["access_token"])
    oauth.client.get("/_sandbox/config")  # admin calls are not logged

    entries = admin(oauth, "GET", "requests")["requests"]
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("POST", "/oauth2/authorize", 302),
        ("POST", "/oauth2/token", 200),
        ("POST", "/oauth2/token", 200),
        ("GET", "/oauth2/token/info", 200),
        ("GET", "/2025-09/orders", 200),
    ]
    assert [e["grant_type"] for e in entries[1:3]] == ["authorization_code", "refresh_token"]
    assert all(e["client_id"] == CLIENT_ID for e in entries)
    assert all(e["operator_id"] == leeds for e in entries)
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert all(isinstance(e["at"], float) and e["duration_ms"] >= 0 for e in entries)

    secrets = [t["value"] for t in admin(oauth, "GET", "tokens")["tokens"]] + [CLIENT_SECRET]
    assert len(secrets) == 6  # code, 2 access, 2 refresh, secret
    logged = json.dumps(entries) + "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) == 5
    for secret in secrets:
        assert secret not in logged

    since = entries[2]["seq"]
    assert [e["seq"] for e in admin(oauth, "GET", f"requests?since={since}")["requests"]] == [
        entries[3]["seq"],
        entries[4]["seq"],
    ]
    admin(oauth, "DELETE", "requests")
    assert admin(oauth, "GET", "requests")["requests"] == []
    oauth.client.get("/2025-09/sites")
    assert admin(oauth, "GET", "requests")["requests"][0]["seq"] == entries[-1]["seq"] + 1


def test_tokens_inventory_states(oauth: OAuth, clock: FakeClock) -> None:
    leeds = oauth.operator_id("Leeds")
    first = oauth.connect(operator_id=leeds)
    second = oauth.refresh(first["refresh_token"]).get_json()
    oauth.api("/sites", second["access_token"])  # revokes the first row (on_use)
    unused_code = oauth.code(operator_id=leeds)
    clock.advance(601)
    inventory = {t["value"]: t for t in admin(oauth, "GET", "tokens")["tokens"]}
    assert inventory[first["access_token"]]["state"] == "revoked"
    assert inventory[first["refresh_token"]]["state"] == "revoked"
    assert inventory[second["access_token"]]["state"] == "active"
    assert inventory[second["refresh_token"]]["state"] == "active"
    assert inventory[unused_code]["state"] == "expired"
    assert inventory[unused_code]["kind"] == "authorization_code"
    assert {t["operator_id"] for t in inventory.values()} == {leeds}
    clock.advance(7200)
    states = {t["value"]: t["state"] for t in admin(oauth, "GET", "tokens")["tokens"]}
    assert states[second["access_token"]] == "expired"
    other = admin(oauth, "GET", f"tokens?operator_id={oauth.operator_id('Camden')}")
    assert other == {"tokens": []}


def test_reset_wipes_state_but_keeps_applications(oauth: OAuth) -> None:
    tokens = oauth.connect()
    oauth.patch_config(revocation_mode="immediate")
    admin(oauth, "POST", "faults", 201, json={"endpoint": "api", "status": 500, "count": -1})
    admin(oauth, "POST", "operators", 201, json={"name": "Temp"})

    result = admin(oauth, "POST", "reset", json={})
    assert [o["name"] for o in result["operators"]] == [
        "Leeds City Storage Ltd",
        "Bristol Box Rooms",
        "Camden Self Store",
    ]
    assert admin(oauth, "GET", "config")["revocation_mode"] == "on_use"
    assert admin(oauth, "GET", "faults") == {"faults": []}
    assert admin(oauth, "GET", "requests") == {"requests": []}
    assert admin(oauth, "GET", "tokens") == {"tokens": []}
    assert oauth.api("/sites", tokens["access_token"]).status_code == 401
    # Applications survive, so a new connection works straight away.
    assert oauth.connect()["access_token"]

    assert admin(oauth, "POST", "reset", json={"seed": None}) == {"operators": []}
    admin(oauth, "POST", "reset", 400, json={"seed": "bogus"})


def test_consent_page_without_operators_explains(oauth: OAuth) -> None:
    admin(oauth, "POST", "reset", json={"seed": None})
    page = oauth.client.get(
        "/oauth2/authorize",
        query_string={
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": REDIRECT_URI,
            "scope": "public.order:read",
        },
    ).get_data(as_text=True)
    assert "no operators" in page
