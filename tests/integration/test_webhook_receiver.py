"""T-11 (reliability.md §8): duplicate, concurrent, replayed, forged and reordered
deliveries to ``POST /webhooks/stora/<route key>``.

(a) fifty concurrent copies of one signed event, against a real gunicorn process and
    from threads through the test client: one inbox row counting fifty deliveries, one
    processing, one order row, one timeline row, every answer 2xx;
(b) the answers of the receipt contract: replay inside the tolerance deduplicated,
    beyond it rejected, forged 401, unknown route 404 (empty), oversized 413, malformed
    400, unknown event type stored and ignored;
(c) any arrival and processing order of several events for one order ends with the
    newest order in ``synced_orders``;
(d) a failed handler keeps its error on the row and ``replay_event`` runs it again;
(e) a route this process verified a moment ago is re-checked on every delivery: a
    disable, a new secret or a destroyed data key takes effect at once;
(f) a receipt connection the database dropped costs a retry, not a 503.

Subscriptions are made directly (status ``active``, a known secret encrypted with the
operator's data key, as the reconciler stores it); processing runs in a real forking
RQ worker.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import time_machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from partner_app.connections.credentials import cipher_for_key, live_data_key
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db
from partner_app.queueing import QUEUE_WEBHOOKS, get_queue, get_redis
from partner_app.security.models import DataKey
from partner_app.stora.signatures import HEADER, sign
from partner_app.sync.models import SyncedOrder
from partner_app.timeline.models import TimelineEvent
from partner_app.webhooks import handlers, jobs
from partner_app.webhooks.inbox import SECRET_COLUMN, SECRET_TABLE
from partner_app.webhooks.models import (
    SubscriptionStatus,
    WebhookEvent,
    WebhookSubscription,
    new_route_key,
)
from tests.conftest import BACKEND, ROOT, free_port, settings_env
from tests.integration.test_sync import work

EXAMPLE = Path(__file__).resolve().parent.parent / "data" / "order-created-webhook.raw.json"
CONCURRENT = 50


# -- building blocks (also used by tests/e2e/test_webhook_crash.py) ------------------------
@dataclass(frozen=True)
class Hook:
    """One operator with one live subscription whose secret the test knows."""

    operator_id: int
    subscription_id: int
    route_key: str
    secret: str

    @property
    def path(self) -> str:
        return f"/webhooks/stora/{self.route_key}"


def make_hook(app, name: str = "Leeds City Storage Ltd",
              status: str = SubscriptionStatus.ACTIVE) -> Hook:
    """Create an active operator and a subscription the way the reconciler stores one:
    the secret encrypted under the operator's data key (table/column bound), committed."""
    vault = app.extensions["vault"]
    secret = secrets.token_hex(32)  # Stora's secrets are 64 hex characters
    route_key = new_route_key()
    with app.app_context():
        operator = Operator(name=name, status=OperatorStatus.ACTIVE,
                            stora_identity=f"name:{name}", connected_at=datetime.now(UTC))
        db.session.add(operator)
        db.session.flush()
        key = live_data_key(operator, vault=vault)
        sub = WebhookSubscription(
            operator_id=operator.id, route_key=route_key, status=status,
            url=f"https://hooks.partner.test/webhooks/stora/{route_key}",
            event_types=["order.created"], stora_endpoint_id=f"we_{secrets.token_hex(6)}",
            secret_ct=cipher_for_key(key, vault=vault).encrypt(SECRET_TABLE, SECRET_COLUMN,
                                                               secret),
            data_key_id=key.id)
        db.session.add(sub)
        db.session.commit()
        hook = Hook(operator.id, sub.id, route_key, secret)
        db.session.remove()
    return hook


def envelope(*, event_id: str | None = None, event_type: str = "order.created",
             order_id: str | None = None, updated_at: datetime | None = None,
             status: str | None = None) -> dict[str, Any]:
    """Stora's documented ``order.created`` example with fresh ids (and overrides)."""
    document = copy.deepcopy(_EXAMPLE)
    event = document["event"]
    event["id"] = event_id or f"evt_{uuid.uuid4().hex[:16]}"
    event["type"] = event_type
    order = event["data"]["order"]
    order["id"] = order_id or f"order_{uuid.uuid4().hex[:16]}"
    if updated_at is not None:
        order["updated_at"] = updated_at.isoformat().replace("+00:00", "Z")
    if status is not None:
        order["status"] = status
    return document


_EXAMPLE = json.loads(EXAMPLE.read_bytes())


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(body: bytes, secret: str, t: int | None = None) -> dict[str, str]:
    """What Stora sends with a delivery (the signature covers these exact bytes)."""
    return {"Content-Type": "application/json", "User-Agent": "Stora-Webhooks/1.0",
            "X-Stora-Request-Id": f"req_{uuid.uuid4().hex[:12]}",
            HEADER: sign(body, secret, int(time.time()) if t is None else t)}


def inbox_rows(operator_id: int) -> list[WebhookEvent]:
    db.session.expire_all()
    rows = list(db.session.scalars(select(WebhookEvent).where(
        WebhookEvent.operator_id == operator_id).order_by(WebhookEvent.id)))
    db.session.commit()  # hold no snapshot or lock while the app or a worker writes
    return rows


def count(model, operator_id: int) -> int:
    value = db.session.scalar(select(func.count()).select_from(model).where(
        model.operator_id == operator_id))
    db.session.commit()
    return value


def queued_webhook_jobs(app) -> int:
    return get_queue(QUEUE_WEBHOOKS, app).count


def process(app) -> None:
    """Drain the webhooks queue with a real forking worker (burst, no scheduler)."""
    db.session.commit()
    work(app, QUEUE_WEBHOOKS)


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def hook(app_ctx) -> Hook:
    return make_hook(app_ctx)


@pytest.fixture(scope="module")
def web(app, backend_urls, sandbox, tmp_path_factory):
    """``partner-app web`` (gunicorn, 2 workers x 4 threads) on the run's database and
    Redis; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, **settings_env(backend_urls, sandbox_url=sandbox.base_url,
                                        public_base_url=base)}
    env.pop("PARTNER_FAILPOINTS", None)
    log_path = tmp_path_factory.mktemp("web") / "web.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "partner_app.cli", "web", "--port",
                                 str(port), "--workers", "2"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"{base}/healthz", proc, log_path)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited; see {log_path}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered; see {log_path}")


# -- (a) concurrency -----------------------------------------------------------------------
def _fire_together(send, n: int) -> list[tuple[int, dict]]:
    """Run ``send()`` from ``n`` threads released at once; their (status, json) answers."""
    barrier = threading.Barrier(n)
    answers: list[tuple[int, dict] | BaseException] = [None] * n  # type: ignore[list-item]

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            answers[index] = send()
        except BaseException as exc:  # reported below, not swallowed
            answers[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors[:3]
    return answers  # type: ignore[return-value]


def _via_gunicorn(base: str, hook: Hook, body: bytes, headers: dict[str, str]):
    def send() -> tuple[int, dict]:
        resp = requests.post(f"{base}{hook.path}", data=body, headers=headers, timeout=30)
        return resp.status_code, (resp.json() if resp.content else {})
    return send


def _via_test_client(app, hook: Hook, body: bytes, headers: dict[str, str]):
    def send() -> tuple[int, dict]:
        # Each thread gets its own app context, hence its own session and connection.
        with app.app_context():
            resp = app.test_client().post(hook.path, data=body, headers=headers)
            db.session.remove()
            return resp.status_code, (resp.get_json(silent=True) or {})
    return send


@pytest.mark.parametrize("through", ["gunicorn", "test_client"])
def test_fifty_concurrent_copies_store_and_apply_one_event(through, request, app_ctx, hook):
    document = envelope()
    body = encode(document)
    headers = signed_headers(body, hook.secret)
    send = (_via_gunicorn(request.getfixturevalue("web"), hook, body, headers)
            if through == "gunicorn" else _via_test_client(app_ctx, hook, body, headers))

    answers = _fire_together(send, CONCURRENT)

    assert sorted({status for status, _ in answers}) == [200], answers
    assert sorted(a["duplicate"] for _, a in answers) == [False] + [True] * (CONCURRENT - 1)
    [row] = inbox_rows(hook.operator_id)
    assert (row.event_id, row.status, row.deliveries) == (document["event"]["id"], "pending",
                                                          CONCURRENT)
    assert row.body.encode() == body  # the raw bytes, exactly as signed
    assert queued_webhook_jobs(app_ctx) == 1  # duplicates enqueue nothing

    process(app_ctx)

    [row] = inbox_rows(hook.operator_id)
    assert (row.status, row.attempts, row.last_error) == ("processed", 1, None)
    order_id = document["event"]["data"]["order"]["id"]
    assert db.session.scalars(select(SyncedOrder.stora_id).where(
        SyncedOrder.operator_id == hook.operator_id)).all() == [order_id]
    assert db.session.scalars(select(TimelineEvent.action_key).where(
        TimelineEvent.operator_id == hook.operator_id)).all() == [f"order.created:{order_id}"]
    assert jobs.sweep_inbox()["stale"] == 0


# -- (b) the receipt contract --------------------------------------------------------------
def _post(client, hook: Hook, body: bytes, headers: dict[str, str]):
    return client.post(hook.path, data=body, headers=headers)


def test_a_replay_inside_the_tolerance_is_a_duplicate_and_beyond_it_is_rejected(
        client, app_ctx, hook):
    body = encode(envelope())
    t0 = int(time.time())
    headers = signed_headers(body, hook.secret, t0)  # captured once, replayed verbatim
    start = datetime.fromtimestamp(t0, UTC)

    with time_machine.travel(start, tick=False):
        first = _post(client, hook, body, headers)
    with time_machine.travel(start + timedelta(seconds=300), tick=False):
        replay_inside = _post(client, hook, body, headers)
    with time_machine.travel(start + timedelta(seconds=301), tick=False):
        replay_beyond = _post(client, hook, body, headers)

    assert (first.status_code, first.get_json()) == (200, {"received": True,
                                                           "duplicate": False})
    assert (replay_inside.status_code, replay_inside.get_json()) == (
        200, {"received": True, "duplicate": True})
    assert (replay_beyond.status_code, replay_beyond.get_json()) == (
        400, {"error": "timestamp_out_of_tolerance"})
    [row] = inbox_rows(hook.operator_id)
    assert row.deliveries == 2  # the rejected replay left no trace
    assert queued_webhook_jobs(app_ctx) == 1


@pytest.mark.parametrize("skew", [-301, 301, -3600])
def test_a_never_seen_event_outside_the_tolerance_is_not_stored(client, app_ctx, hook, skew):
    body = encode(envelope())
    resp = _post(client, hook, body, signed_headers(body, hook.secret, int(time.time()) + skew))
    assert (resp.status_code, resp.get_json()) == (400, {"error": "timestamp_out_of_tolerance"})
    assert inbox_rows(hook.operator_id) == []


@pytest.mark.parametrize("forgery", ["other_secret", "tampered_body", "other_operators_secret"])
def test_a_forged_signature_is_401_and_nothing_is_stored(client, app_ctx, hook, forgery):
    body = encode(envelope())
    if forgery == "other_secret":
        headers = signed_headers(body, secrets.token_hex(32))
    elif forgery == "tampered_body":
        headers = signed_headers(body, hook.secret)
        body = body.replace(b'"status":"draft"', b'"status":"paid!"')
    else:  # a valid signature for another operator's route is not valid for this one
        other = make_hook(app_ctx, name="Bristol Box Rooms")
        headers = signed_headers(body, other.secret)
    resp = _post(client, hook, body, headers)
    assert (resp.status_code, resp.get_json()) == (401, {"error": "no_match"})
    assert inbox_rows(hook.operator_id) == []
    assert queued_webhook_jobs(app_ctx) == 0


@pytest.mark.parametrize("route", ["unknown", "disabled", "too_long"])
def test_an_unknown_route_is_404_with_an_empty_body(client, app_ctx, hook, route):
    body = encode(envelope())
    if route == "disabled":
        target = make_hook(app_ctx, name="Closed Storage", status=SubscriptionStatus.DISABLED)
    else:
        key = new_route_key() if route == "unknown" else "k" * 65
        target = Hook(hook.operator_id, hook.subscription_id, key, hook.secret)
    resp = _post(client, target, body, signed_headers(body, target.secret))
    assert resp.status_code == 404
    assert resp.data == b""
    assert db.session.scalar(select(func.count()).select_from(WebhookEvent)) == 0


def _padded_to(size: int) -> bytes:
    """A valid envelope of exactly ``size`` bytes."""
    document = envelope()
    document["event"]["data"]["order"]["metadata"] = {"pad": ""}
    short = len(encode(document))
    document["event"]["data"]["order"]["metadata"]["pad"] = "x" * (size - short)
    body = encode(document)
    assert len(body) == size
    return body


def test_a_body_over_the_limit_is_413_and_one_at_the_limit_is_stored(client, app_ctx, hook):
    limit = app_ctx.extensions["settings"].webhook_max_body
    over = _padded_to(limit + 1)
    resp = _post(client, hook, over, signed_headers(over, hook.secret))
    assert (resp.status_code, resp.get_json()) == (413, {"error": "too_large"})
    assert inbox_rows(hook.operator_id) == []

    at_limit = _padded_to(limit)
    assert _post(client, hook, at_limit, signed_headers(at_limit, hook.secret)).status_code == 200
    assert len(inbox_rows(hook.operator_id)) == 1


def test_an_oversized_chunked_body_is_413_through_gunicorn(web, app_ctx, hook):
    """No Content-Length: the limit must still hold on the bytes actually read."""
    limit = app_ctx.extensions["settings"].webhook_max_body
    body = _padded_to(limit + 1)
    headers = signed_headers(body, hook.secret)

    def chunks():
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    resp = requests.post(f"{web}{hook.path}", data=chunks(), headers=headers, timeout=30)
    assert (resp.status_code, resp.json()) == (413, {"error": "too_large"})
    assert inbox_rows(hook.operator_id) == []


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"event":{"id":"evt_1","type":"order.created"', "malformed_json"),
    (b"\xff\xfe not utf-8", "malformed_json"),
    (b"[]", "no_event"),
    (b'{"event":{"type":"order.created","data":{}}}', "no_event_id"),
    (b'{"event":{"id":"evt_2","data":{}}}', "no_event_type"),
])
def test_a_malformed_body_with_a_valid_signature_is_400(client, app_ctx, hook, body, reason):
    resp = _post(client, hook, body, signed_headers(body, hook.secret))
    assert (resp.status_code, resp.get_json()) == (400, {"error": reason})
    assert inbox_rows(hook.operator_id) == []


def test_an_unknown_event_type_is_stored_then_ignored(client, app_ctx, hook):
    document = envelope(event_type="contact.churned")
    document["event"]["data"] = {"contact": {"id": "con_a83b17e2f09c4d55"}}
    body = encode(document)
    assert handlers.handler_for("contact.churned") is None
    resp = _post(client, hook, body, signed_headers(body, hook.secret))
    assert (resp.status_code, resp.get_json()["duplicate"]) == (200, False)

    process(app_ctx)

    [row] = inbox_rows(hook.operator_id)
    assert (row.event_type, row.status, row.attempts, row.last_error) == (
        "contact.churned", "ignored", 1, None)
    assert row.processed_at is not None
    assert count(SyncedOrder, hook.operator_id) == 0


# -- (c) order independence ----------------------------------------------------------------
VERSIONS = 4


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(offsets=st.lists(st.integers(min_value=0, max_value=86_400), min_size=VERSIONS,
                        max_size=VERSIONS, unique=True),
       arrival=st.permutations(range(VERSIONS)), processing=st.permutations(range(VERSIONS)))
def test_any_order_of_events_for_one_order_keeps_the_newest(client, app_ctx, hook, offsets,
                                                             arrival, processing):
    """Arrival order and processing order are drawn independently: a queue does not
    keep the order in which rows were stored."""
    order_id = f"order_{uuid.uuid4().hex[:16]}"  # a fresh order per example
    base = datetime(2025, 10, 14, 9, 0, tzinfo=UTC)
    documents = [envelope(order_id=order_id, updated_at=base + timedelta(seconds=offset),
                          status=f"v{offset}") for offset in offsets]
    row_ids = {}
    for index in arrival:
        body = encode(documents[index])
        resp = _post(client, hook, body, signed_headers(body, hook.secret))
        assert resp.status_code == 200
        row_ids[index] = db.session.scalar(select(WebhookEvent.id).where(
            WebhookEvent.event_id == documents[index]["event"]["id"]))
    db.session.commit()
    for index in processing:
        assert jobs.process_webhook_event(row_ids[index])["status"] == "processed"

    newest = documents[offsets.index(max(offsets))]["event"]["data"]["order"]
    stored = db.session.scalars(select(SyncedOrder).where(
        SyncedOrder.operator_id == hook.operator_id, SyncedOrder.stora_id == order_id)).one()
    assert stored.payload == newest
    assert stored.status == newest["status"]
    assert stored.stora_updated_at == base + timedelta(seconds=max(offsets))
    assert db.session.scalar(select(func.count()).select_from(TimelineEvent).where(
        TimelineEvent.action_key == f"order.created:{order_id}")) == 1
    db.session.commit()


# -- (d) failure and replay ----------------------------------------------------------------
def test_a_failed_handler_keeps_its_error_and_a_replay_runs_it_again(client, app_ctx, hook,
                                                                     monkeypatch):
    document = envelope()
    body = encode(document)
    assert _post(client, hook, body, signed_headers(body, hook.secret)).status_code == 200

    def broken(*args, **kwargs):
        raise RuntimeError("synced_orders is unavailable")

    # The forked work-horse inherits the patched handler dependency.
    monkeypatch.setattr(handlers, "upsert_orders", broken)
    process(app_ctx)

    [row] = inbox_rows(hook.operator_id)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.last_error == "RuntimeError: synced_orders is unavailable"
    assert row.claimed_at is None
    assert count(SyncedOrder, hook.operator_id) == 0
    assert count(TimelineEvent, hook.operator_id) == 0  # the failed attempt rolled back

    monkeypatch.undo()
    jobs.replay_event(row.id)
    process(app_ctx)

    [row] = inbox_rows(hook.operator_id)
    assert (row.status, row.attempts, row.last_error) == ("processed", 2, None)
    assert count(SyncedOrder, hook.operator_id) == 1
    assert count(TimelineEvent, hook.operator_id) == 1
    # RQ's own retry of the failed attempt, arriving after the replay, changes nothing.
    assert jobs.process_webhook_event(row.id) == {"skipped": True}
    assert inbox_rows(hook.operator_id)[0].attempts == 2


# -- (e) what this process remembers of a route never outlives the route -------------------
def _deliver(client, hook: Hook, secret: str | None = None):
    body = encode(envelope())
    return _post(client, hook, body, signed_headers(body, secret or hook.secret))


def _change_subscription(app, hook: Hook, **values) -> None:
    with app.app_context():
        db.session.execute(update(WebhookSubscription).where(
            WebhookSubscription.id == hook.subscription_id).values(**values))
        db.session.commit()


def test_a_disabled_route_is_404_at_once_though_it_was_just_verified(client, app_ctx, hook):
    assert _deliver(client, hook).status_code == 200  # remembered from here on
    _change_subscription(app_ctx, hook, status=SubscriptionStatus.DISABLED)
    assert _deliver(client, hook).status_code == 404
    assert len(inbox_rows(hook.operator_id)) == 1


def test_a_replaced_secret_verifies_at_once_and_the_old_one_no_longer_does(client, app_ctx,
                                                                            hook):
    assert _deliver(client, hook).status_code == 200
    new_secret = secrets.token_hex(32)
    vault = app_ctx.extensions["vault"]
    with app_ctx.app_context():
        sub = db.session.get(WebhookSubscription, hook.subscription_id)
        key = db.session.get(DataKey, sub.data_key_id)
        sub.secret_ct = cipher_for_key(key, vault=vault).encrypt(SECRET_TABLE, SECRET_COLUMN,
                                                                 new_secret)
        db.session.commit()
    assert _deliver(client, hook, new_secret).status_code == 200
    old = _deliver(client, hook)
    assert (old.status_code, old.get_json()) == (401, {"error": "no_match"})
    assert len(inbox_rows(hook.operator_id)) == 2


def test_a_destroyed_data_key_stops_deliveries_at_once(client, app_ctx, hook):
    assert _deliver(client, hook).status_code == 200
    with app_ctx.app_context():
        key_id = db.session.get(WebhookSubscription, hook.subscription_id).data_key_id
        db.session.execute(update(DataKey).where(DataKey.id == key_id).values(
            wrapped_key=None, destroyed_at=datetime.now(UTC)))
        db.session.commit()
    resp = _deliver(client, hook)
    assert (resp.status_code, resp.get_json()) == (503, {"error": "secret_unreadable"})
    assert len(inbox_rows(hook.operator_id)) == 1


# -- (f) the receiver's own pool -------------------------------------------------------------
@pytest.mark.skipif(BACKEND != "services", reason="needs a database server to drop connections")
def test_connections_the_server_dropped_cost_a_retry_not_a_503(client, app_ctx, hook):
    """The receipt pool has no pre-ping: after PostgreSQL ends its sessions (a restart,
    a failover) the next delivery's first attempt fails on a dead connection, and the
    retry on a fresh one stores it (200) and still asks for a drain."""
    from partner_app.webhooks import receipt_db
    from partner_app.webhooks.jobs import DRAIN_MARK

    assert _deliver(client, hook).status_code == 200  # the pool now holds a connection
    engine = receipt_db.engine_for(app_ctx, db.engine)
    assert engine.pool.checkedin() >= 1
    # This process's receipt sessions (other tests' web servers have their own).
    held = [engine.connect() for _ in range(engine.pool.checkedin())]
    pids = [conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() for conn in held]
    for conn in held:
        conn.close()
    ended = db.session.execute(sa.text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = :name AND pid = ANY(:pids)"),
        {"name": receipt_db.APPLICATION_NAME, "pids": pids}).scalar()
    db.session.commit()
    assert ended == len(pids) == engine.pool.checkedin()
    redis = get_redis(app_ctx)
    redis.delete(DRAIN_MARK)
    jobs._last_request = -1e9  # this process did not ask a moment ago

    resp = _deliver(client, hook)
    assert (resp.status_code, resp.get_json()["duplicate"]) == (200, False)
    assert len(inbox_rows(hook.operator_id)) == 2
    assert redis.exists(DRAIN_MARK)
