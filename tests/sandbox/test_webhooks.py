"""Webhook delivery to a real local HTTP receiver: envelope, signature (verified here,
independently of the sandbox's signer), retries and their schedule, re-signing,
duplicates, shuffling, auto-disable, flush, reset and the admin emit endpoint."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stora_sandbox import webhooks
from tests.sandbox.support import (
    ALL_TEST_SCOPES,
    FakeClock,
    OAuth,
    Received,
    Receiver,
    admin,
    bearer,
)

RAW_EXAMPLE = Path(__file__).parent / "data" / "order-created-webhook.raw.json"
VECTOR_SECRET = "7f3c9a1e5b2d8f4067a1c3e5b7d9f0a2c4e6b8d0f1a3c5e7b9d1f3a5c7e9b1d3"
VECTOR_HEADER = "t=1760433165,v1=e04d239e1e7430379dd65db4cd86cf6be7730255992024413603d1ba7eaca787"


def verify(secret: str, header: str | None, body: bytes) -> int:
    """Check ``X-Stora-Signature`` the way a partner would; return its ``t``."""
    assert header is not None
    items = dict(part.split("=", 1) for part in header.split(","))
    assert set(items) == {"t", "v1"}
    signed = items["t"].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, items["v1"]), "signature mismatch"
    return int(items["t"])


def event_of(received: Received) -> dict:
    return json.loads(received.body)["event"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box = Receiver()
    yield box
    box.close()


@pytest.fixture
def token(oauth: OAuth) -> str:
    return oauth.connect(scope=ALL_TEST_SCOPES)["access_token"]


def subscribe(
    oauth: OAuth, token: str, url: str, event_types: tuple[str, ...] = ("order.created",)
) -> dict:
    body = {"name": "hooks", "api_version": "2025-09", "url": url, "event_types": list(event_types)}
    response = oauth.client.post("/2025-09/webhook_endpoints", json=body, headers=bearer(token))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["endpoint"]


def create_orders(oauth: OAuth, count: int = 1, operator: str = "Leeds") -> list[dict]:
    path = f"operators/{oauth.operator_id(operator)}/orders"
    return admin(oauth, "POST", path, 201, json={"count": count})["orders"]


def attempts(oauth: OAuth, endpoint_id: str | None = None) -> list[dict]:
    query = f"?endpoint_id={endpoint_id}" if endpoint_id else ""
    return admin(oauth, "GET", f"webhook_deliveries{query}")["deliveries"]


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# -- the signer and the envelope against the docs' fixtures -----------------------------


def test_signer_matches_the_test_vector() -> None:
    raw = RAW_EXAMPLE.read_bytes()
    assert len(raw) == 2796
    assert webhooks.signature_header(VECTOR_SECRET, 1760433165, raw) == VECTOR_HEADER
    assert verify(VECTOR_SECRET, VECTOR_HEADER, raw) == 1760433165  # the test's own check


def test_encoding_is_byte_compatible_with_the_raw_example() -> None:
    raw = RAW_EXAMPLE.read_bytes()
    assert webhooks.encode(json.loads(raw)) == raw


# -- delivery -------------------------------------------------------------------------


def test_order_created_is_delivered_signed_and_shaped(
    oauth: OAuth, token: str, receiver: Receiver, clock: FakeClock
) -> None:
    endpoint = subscribe(oauth, token, receiver.url)
    started = time.monotonic()
    (order,) = create_orders(oauth)
    (got,) = receiver.wait_for(1)
    assert got.path == "/stora/webhooks/conn_1"
    assert got.header("Content-Type") == "application/json"
    assert got.header("User-Agent") == "Stora-Webhooks/1.0"
    uuid.UUID(got.header("X-Stora-Request-Id"))
    assert verify(endpoint["secret"], got.header("X-Stora-Signature"), got.body) == int(clock.now)
    envelope = json.loads(got.body)
    assert list(envelope) == ["event"]
    event = envelope["event"]
    assert list(event) == ["id", "type", "api_version", "created_at", "data", "meta"]
    assert event["id"].startswith("evt_")
    assert (event["type"], event["api_version"]) == ("order.created", "2025-09")
    assert list(event["data"]) == ["order"]
    delivered = event["data"]["order"]
    assert delivered["id"] == order["id"]
    # Related contact and site are embedded in full, unlike in the REST response.
    assert delivered["site"]["id"] == order["site"]["id"] and "name" in delivered["site"]
    if order["contact"] is not None:
        assert "email" in delivered["contact"]
    assert {k: v for k, v in delivered.items() if k not in ("contact", "site")} == {
        k: v for k, v in order.items() if k not in ("contact", "site")
    }
    assert [c["name"] for c in event["meta"]["curies"]] == ["bo", "sf"]
    compact = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
    assert got.body == compact
    wait_until(lambda: len(attempts(oauth)) == 1)  # logged once the answer is read
    (entry,) = attempts(oauth)
    assert entry["ok"] is True and entry["status_code"] == 200
    assert (entry["event_id"], entry["endpoint_id"], entry["attempt"]) == (
        event["id"],
        endpoint["id"],
        1,
    )
    assert entry["request_id"] == got.header("X-Stora-Request-Id")
    assert endpoint["secret"] not in json.dumps(admin(oauth, "GET", "webhook_deliveries"))
    assert time.monotonic() - started < 5


def test_only_enabled_subscribed_endpoints_of_the_operator_receive(
    oauth: OAuth, token: str, receiver: Receiver
) -> None:
    base = receiver.url.rsplit("/", 3)[0]
    contacts_only = subscribe(oauth, token, f"{base}/contacts", ("contact.updated",))
    disabled = subscribe(oauth, token, f"{base}/disabled", ("order.created",))
    oauth.client.post(f"/2025-09/webhook_endpoints/{disabled['id']}/disable", headers=bearer(token))
    bristol = oauth.connect(operator_id=oauth.operator_id("Bristol"), scope=ALL_TEST_SCOPES)
    subscribe(oauth, bristol["access_token"], f"{base}/bristol", ("order.created",))
    create_orders(oauth)  # Leeds: nobody subscribed and enabled
    emitted = admin(
        oauth,
        "POST",
        f"operators/{oauth.operator_id()}/events",
        201,
        json={"type": "contact.updated"},
    )
    (got,) = receiver.wait_for(1)
    admin(oauth, "POST", "webhook_deliveries/flush", json={})
    assert len(receiver.received) == 1
    assert got.path == "/contacts"
    assert event_of(got)["id"] == emitted["event"]["id"]
    assert verify(contacts_only["secret"], got.header("X-Stora-Signature"), got.body)
    assert len(emitted["deliveries"]) == 1


def test_retries_after_500_follow_the_schedule(
    oauth: OAuth, token: str, receiver: Receiver
) -> None:
    oauth.patch_config(webhook_time_factor=0.002)  # 1 min -> 120 ms, 5 min -> 600 ms
    receiver.respond = lambda n: (500 if n <= 2 else 200, 0.0)
    endpoint = subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    first, second, third = receiver.wait_for(3)
    assert len({event_of(r)["id"] for r in (first, second, third)}) == 1
    assert len({r.header("X-Stora-Request-Id") for r in (first, second, third)}) == 3
    for received in (first, second, third):
        verify(endpoint["secret"], received.header("X-Stora-Signature"), received.body)
    assert second.at - first.at >= 0.12
    assert third.at - second.at >= 0.6
    wait_until(lambda: len(attempts(oauth)) == 3)
    log = attempts(oauth)
    assert [(e["attempt"], e["status_code"], e["ok"]) for e in log] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    assert [e["next_attempt_in_s"] for e in log] == pytest.approx([0.12, 0.6, None])


def test_six_retries_then_give_up(oauth: OAuth, token: str, receiver: Receiver) -> None:
    oauth.patch_config(webhook_time_factor=0.00001)  # the whole schedule in ~0.6 s
    receiver.respond = lambda _n: (503, 0.0)
    subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    receiver.wait_for(7)
    wait_until(lambda: len(attempts(oauth)) == 7)
    log = attempts(oauth)
    delays = [60, 300, 1800, 7200, 18_000, 36_000]
    assert [e["next_attempt_in_s"] for e in log] == pytest.approx(
        [d * 0.00001 for d in delays] + [None]
    )
    assert [e["gave_up"] for e in log] == [False] * 6 + [True]
    time.sleep(0.1)
    assert len(receiver.received) == 7
    assert admin(oauth, "GET", "webhook_deliveries")["pending"] == []


@pytest.mark.parametrize("resign", [True, False])
def test_retries_are_resigned_unless_switched_off(
    oauth: OAuth, token: str, receiver: Receiver, clock: FakeClock, resign: bool
) -> None:
    oauth.patch_config(webhook_resign_retries=resign)  # time factor 1: retry in a minute
    receiver.respond = lambda n: (500 if n == 1 else 204, 0.0)
    endpoint = subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    (first,) = receiver.wait_for(1)
    wait_until(lambda: admin(oauth, "GET", "webhook_deliveries")["pending"] != [])
    (pending,) = admin(oauth, "GET", "webhook_deliveries")["pending"]
    assert pending["attempt"] == 2 and 50 < pending["due_in_s"] <= 60
    clock.advance(60)
    assert admin(oauth, "POST", "webhook_deliveries/flush", json={}) == {
        "flushed": 1,
        "pending": 0,
    }
    _first, second = receiver.wait_for(2)
    t1 = verify(endpoint["secret"], first.header("X-Stora-Signature"), first.body)
    t2 = verify(endpoint["secret"], second.header("X-Stora-Signature"), second.body)
    assert t2 - t1 == (60 if resign else 0)
    assert second.header("X-Stora-Request-Id") != first.header("X-Stora-Request-Id")


def test_connection_errors_and_timeouts_fail_the_attempt(
    oauth: OAuth, token: str, receiver: Receiver
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    refused = subscribe(oauth, token, f"http://127.0.0.1:{closed_port}/gone")
    oauth.patch_config(webhook_timeout_s=0.2)
    receiver.respond = lambda _n: (200, 0.6)
    slow = subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    wait_until(lambda: len(attempts(oauth)) == 2)
    by_endpoint = {e["endpoint_id"]: e for e in attempts(oauth)}
    assert by_endpoint[refused["id"]]["status_code"] is None
    assert "Connection" in by_endpoint[refused["id"]]["error"]
    assert by_endpoint[slow["id"]]["status_code"] is None
    assert "timed out" in by_endpoint[slow["id"]]["error"]
    assert all(e["next_attempt_in_s"] == 60 for e in by_endpoint.values())


def test_duplicates_when_switched_on(oauth: OAuth, token: str, receiver: Receiver) -> None:
    oauth.patch_config(webhook_duplicate_rate=1.0)
    endpoint = subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    one, two = receiver.wait_for(2)
    assert one.body == two.body
    assert event_of(one)["id"] == event_of(two)["id"]
    assert one.header("X-Stora-Request-Id") != two.header("X-Stora-Request-Id")
    for received in (one, two):
        verify(endpoint["secret"], received.header("X-Stora-Signature"), received.body)
    wait_until(lambda: len(attempts(oauth)) == 2)
    assert sorted(e["duplicate"] for e in attempts(oauth)) == [False, True]


def test_shuffle_delivers_a_batch_out_of_order(
    oauth: OAuth, token: str, receiver: Receiver
) -> None:
    oauth.patch_config(webhook_shuffle=True)
    subscribe(oauth, token, receiver.url)
    created = [o["id"] for o in create_orders(oauth, count=5)]
    delivered = [event_of(r)["data"]["order"]["id"] for r in receiver.wait_for(5)]
    assert sorted(delivered) == sorted(created)
    assert delivered != created


def test_in_order_without_shuffle(oauth: OAuth, token: str, receiver: Receiver) -> None:
    subscribe(oauth, token, receiver.url)
    created = [o["id"] for o in create_orders(oauth, count=5)]
    delivered = [event_of(r)["data"]["order"]["id"] for r in receiver.wait_for(5)]
    assert delivered == created


def test_auto_disable_after_consecutive_failures(
    oauth: OAuth, token: str, receiver: Receiver
) -> None:
    oauth.patch_config(webhook_auto_disable_after=2, webhook_time_factor=0.0001)
    receiver.respond = lambda _n: (500, 0.0)
    endpoint = subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    wait_until(lambda: len(attempts(oauth)) == 2)
    time.sleep(0.1)
    log = attempts(oauth)
    assert [(e["endpoint_disabled"], e["gave_up"]) for e in log] == [(False, False), (True, True)]
    shown = oauth.api(f"/webhook_endpoints/{endpoint['id']}", token).get_json()["endpoint"]
    assert shown["status"] == "disabled" and shown["disabled_at"] is not None
    create_orders(oauth)
    admin(oauth, "POST", "webhook_deliveries/flush", json={})
    assert len(receiver.received) == 2


def test_disabling_drops_pending_retries(oauth: OAuth, token: str, receiver: Receiver) -> None:
    receiver.respond = lambda _n: (500, 0.0)
    endpoint = subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    receiver.wait_for(1)
    wait_until(lambda: len(admin(oauth, "GET", "webhook_deliveries")["pending"]) == 1)
    path = f"/2025-09/webhook_endpoints/{endpoint['id']}/disable"
    assert oauth.client.post(path, headers=bearer(token)).status_code == 200
    admin(oauth, "POST", "webhook_deliveries/flush", json={})
    skipped = attempts(oauth, endpoint["id"])[-1]
    assert (skipped["attempt"], skipped["skipped"], skipped["error"]) == (
        2,
        True,
        "endpoint_disabled",
    )
    assert len(receiver.received) == 1


def test_reset_clears_queued_retries_and_the_log(
    oauth: OAuth, token: str, receiver: Receiver
) -> None:
    receiver.respond = lambda _n: (500, 0.0)
    subscribe(oauth, token, receiver.url)
    create_orders(oauth)
    receiver.wait_for(1)
    wait_until(lambda: len(admin(oauth, "GET", "webhook_deliveries")["pending"]) == 1)
    admin(oauth, "POST", "reset", json={})
    assert admin(oauth, "GET", "webhook_deliveries") == {"deliveries": [], "pending": []}
    assert admin(oauth, "POST", "webhook_deliveries/flush", json={}) == {
        "flushed": 0,
        "pending": 0,
    }
    assert len(receiver.received) == 1


def test_emitting_events_does_not_wait_for_the_receiver(
    oauth: OAuth, token: str, receiver: Receiver
) -> None:
    receiver.respond = lambda _n: (200, 0.6)
    subscribe(oauth, token, receiver.url)
    started = time.monotonic()
    create_orders(oauth)
    assert time.monotonic() - started < 0.5
    receiver.wait_for(1)


def test_admin_emit_any_event_type(oauth: OAuth, token: str, receiver: Receiver) -> None:
    endpoint = subscribe(oauth, token, receiver.url, ("invoice.paid", "contact.updated"))
    operator = oauth.operator_id()
    data = {"invoice": {"id": "inv_0123456789abcdef", "total": {"amount": 100}}}
    paid = admin(
        oauth,
        "POST",
        f"operators/{operator}/events",
        201,
        json={"type": "invoice.paid", "data": data},
    )
    assert paid["event"]["data"] == data
    contact = admin(
        oauth, "POST", f"operators/{operator}/events", 201, json={"type": "contact.updated"}
    )
    assert contact["event"]["data"]["contact"]["id"].startswith("con_")
    first, second = receiver.wait_for(2)
    assert event_of(first) == paid["event"]
    assert event_of(second) == contact["event"]
    verify(endpoint["secret"], first.header("X-Stora-Signature"), first.body)
    unit = admin(oauth, "POST", f"operators/{operator}/events", 201, json={"type": "unit.updated"})
    assert unit["deliveries"] == []  # not subscribed
    assert unit["event"]["data"]["unit"]["id"].startswith("unit_")
    for bad in ({"type": "order.exploded"}, {}, {"type": "order.created", "data": []}):
        admin(oauth, "POST", f"operators/{operator}/events", 400, json=bad)
    admin(oauth, "POST", "operators/opr_missing/events", 404, json={"type": "order.created"})
