"""Webhook subscriptions against the real sandbox, with real forking workers.

Connect creates one endpoint with our receiver URL and stores its secret encrypted; a
create whose answer was lost is replayed (same key, same endpoint), one whose key may be
past Stora's window is replaced; drift is repaired (disabled → enabled or replaced,
missing → created again, URL and event types patched back) and starts a backfill;
rotation keeps both subscriptions verifying their own deliveries until the old one
retires; disconnect disables endpoints at Stora before anything local changes.

The Flask test client has no socket the sandbox could deliver to, so deliveries are
signed here with the endpoint's secret (read from the sandbox's admin API, which shows
secrets for exactly this kind of check) and posted through the test client.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from partner_app.audit import AuditEntry
from partner_app.cli import cli
from partner_app.connections.disconnect import DisconnectFailed, disconnect_operator
from partner_app.connections.jobs import client_for
from partner_app.connections.models import Credential, Operator, OperatorStatus
from partner_app.db import db
from partner_app.queueing import QUEUE_DEFAULT, QUEUE_SYNC, QUEUE_WEBHOOKS, get_queue, get_redis
from partner_app.stora.errors import ApiUnavailable
from partner_app.stora.signatures import HEADER, sign
from partner_app.sync.models import SyncedOrder, SyncRun
from partner_app.webhooks import reconcile_jobs, subscriptions
from partner_app.webhooks.inbox import subscription_secret
from partner_app.webhooks.models import WebhookEvent, WebhookSubscription
from tests.integration.test_install_flow import BRISTOL, LEEDS, install
from tests.integration.test_sync import last_seq, release_scheduled, sandbox_operator, work
from workers.cron import build_scheduler

ENDPOINTS_PATH = "/2025-09/webhook_endpoints"
RAW_EVENT = Path(__file__).resolve().parent.parent / "data" / "order-created-webhook.raw.json"


# -- helpers --------------------------------------------------------------------------------
def connect(client, sandbox, name: str = LEEDS) -> tuple[int, str]:
    """Install through the consent page; (our operator id, the sandbox's operator id)."""
    install(client, name)
    operator_id = db.session.scalar(select(Operator.id).where(Operator.name == name))
    db.session.rollback()
    return operator_id, sandbox_operator(sandbox, name)["id"]


def subscribe(app, client, sandbox, name: str = LEEDS) -> tuple[int, str]:
    """Connect and let a worker run the connect's reconcile job."""
    ids = connect(client, sandbox, name)
    work(app, QUEUE_WEBHOOKS)
    return ids


def subs(operator_id: int) -> list[WebhookSubscription]:
    db.session.rollback()
    return list(db.session.scalars(select(WebhookSubscription)
                                   .where(WebhookSubscription.operator_id == operator_id)
                                   .order_by(WebhookSubscription.id)))


def active(operator_id: int) -> WebhookSubscription:
    [sub] = [sub for sub in subs(operator_id) if sub.status == "active"]
    return sub


def stora_endpoints(sandbox, sandbox_operator_id: str) -> list[dict]:
    """The sandbox's endpoints of one operator, secrets included (admin API)."""
    return sandbox.admin("GET", f"webhook_endpoints?operator_id={sandbox_operator_id}")[
        "webhook_endpoints"]


def by_id(endpoints: list[dict]) -> dict[str, dict]:
    return {endpoint["id"]: endpoint for endpoint in endpoints}


def creates(sandbox, since: int) -> list[dict]:
    return [r for r in sandbox.requests_log(since)
            if r["method"] == "POST" and r["path"] == ENDPOINTS_PATH]


def envelope(event_id: str, order: dict | None = None) -> bytes:
    """An order.created delivery body; the documented example's order unless given."""
    document = json.loads(RAW_EVENT.read_bytes())
    document["event"]["id"] = event_id
    if order is not None:
        document["event"]["data"] = {"order": order}
    return json.dumps(document, separators=(",", ":")).encode()


def deliver(client, route_key: str, secret: str, body: bytes):
    return client.post(f"/webhooks/stora/{route_key}", data=body,
                       headers={"Content-Type": "application/json",
                                HEADER: sign(body, secret, int(time.time()))})


def reconcile(operator_id: int, **kwargs) -> dict:
    """One reconcile pass in this process (the jobs run the same function)."""
    result = subscriptions.reconcile_operator(operator_id, **kwargs)
    db.session.rollback()
    return result


def backfills(operator_id: int) -> list[SyncRun]:
    db.session.rollback()
    return list(db.session.scalars(select(SyncRun).where(
        SyncRun.operator_id == operator_id,
        SyncRun.requested_by == subscriptions.BACKFILL_REQUESTER)))


def redis_values(app) -> str:
    """Every string and hash value in Redis (job arguments, results, metadata)."""
    connection = get_redis(app)
    parts = []
    for key in connection.scan_iter():
        kind = connection.type(key)
        if kind == b"string":
            parts.append(connection.get(key) or b"")
        elif kind == b"hash":
            parts += list(connection.hgetall(key).values())
    return b"\n".join(parts).decode("utf-8", "replace")


# -- connect ----------------------------------------------------------------------------------
def test_connect_creates_one_endpoint_and_stores_its_secret_encrypted(client, app_ctx,
                                                                      sandbox, settings):
    operator_id, stora_operator = connect(client, sandbox)
    assert get_queue(QUEUE_WEBHOOKS).job_ids == [reconcile_jobs.connect_job_id(operator_id, 1)]
    since = last_seq(sandbox)
    work(app_ctx, QUEUE_WEBHOOKS)

    sub = active(operator_id)
    [endpoint] = stora_endpoints(sandbox, stora_operator)
    assert endpoint["id"] == sub.stora_endpoint_id and endpoint["status"] == "enabled"
    assert endpoint["url"] == f"{settings.public_base_url}/webhooks/stora/{sub.route_key}"
    assert sub.url == endpoint["url"]
    assert endpoint["event_types"] == list(settings.webhook_event_types) == ["order.created"]
    assert endpoint["api_version"] == "2025-09"
    assert endpoint["metadata"] == {"subscription_id": str(sub.id),
                                    "managed_by": subscriptions.MANAGED_BY}
    secret = endpoint["secret"]
    assert sub.secret_ct.startswith("v1.") and secret not in sub.secret_ct
    assert subscription_secret(sub, vault=app_ctx.extensions["vault"]) == secret
    assert sub.last_error is None and sub.last_reconciled_at is not None
    [create] = creates(sandbox, since)
    assert create["status"] == 201 and create["idempotency_key"] == sub.create_idempotency_key

    # Steady state: a second pass only checks (one GET of the endpoint, one list).
    since = last_seq(sandbox)
    assert reconcile(operator_id)["actions"] == []
    calls = [(r["method"], r["path"]) for r in sandbox.requests_log(since)]
    assert calls == [("GET", f"{ENDPOINTS_PATH}/{endpoint['id']}"), ("GET", ENDPOINTS_PATH)]
    assert len(stora_endpoints(sandbox, stora_operator)) == 1

    # The secret is nowhere but in its ciphertext: not in Redis (job args and results),
    # not in the audit log, not in any error.
    assert secret not in redis_values(app_ctx)
    for entry in db.session.scalars(select(AuditEntry)):
        assert secret not in json.dumps(entry.detail)


def test_signed_deliveries_are_verified_stored_once_and_processed(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    sub = active(operator_id)
    secret = stora_endpoints(sandbox, stora_operator)[0]["secret"]
    order = sandbox.admin("POST", f"operators/{stora_operator}/orders", json={"count": 1})[
        "orders"][0]
    body = envelope("evt_subscription_test_1", order)

    first = deliver(client, sub.route_key, secret, body)
    assert first.status_code == 200 and first.json == {"received": True, "duplicate": False}
    again = deliver(client, sub.route_key, secret, body)
    assert again.status_code == 200 and again.json["duplicate"] is True
    assert deliver(client, sub.route_key, "0" * 64, body).status_code == 401
    assert deliver(client, "no-such-route", secret, body).status_code == 404

    work(app_ctx, QUEUE_WEBHOOKS, QUEUE_DEFAULT)
    db.session.rollback()
    [event] = db.session.scalars(select(WebhookEvent)).all()
    assert (event.status, event.deliveries, event.subscription_id) == ("processed", 2, sub.id)
    assert db.session.scalar(select(SyncedOrder.stora_id)) == order["id"]
    recorded = sandbox.admin("GET", f"operators/{stora_operator}/timeline_events")[
        "timeline_events"]
    assert [order["id"] in e["sandbox"]["message"] for e in recorded] == [True]


# -- creating safely ---------------------------------------------------------------------------
def test_a_create_whose_answer_was_lost_is_replayed_not_duplicated(client, app_ctx, sandbox,
                                                                   monkeypatch):
    operator_id, stora_operator = connect(client, sandbox)
    since = last_seq(sandbox)
    sandbox.admin("POST", "faults", json={"endpoint": "api", "mode": "drop_after_commit"})
    work(app_ctx, QUEUE_WEBHOOKS)  # the create commits at Stora; its answer is lost

    [sub] = subs(operator_id)
    assert sub.status == "pending" and sub.last_error.startswith("create in doubt")
    [created] = stora_endpoints(sandbox, stora_operator)
    release_scheduled(app_ctx, monkeypatch, queues=(QUEUE_WEBHOOKS,))  # RQ's Retry
    work(app_ctx, QUEUE_WEBHOOKS)

    sub = active(operator_id)
    assert [e["id"] for e in stora_endpoints(sandbox, stora_operator)] == [created["id"]]
    assert sub.stora_endpoint_id == created["id"]
    assert subscription_secret(sub, vault=app_ctx.extensions["vault"]) == created["secret"]
    attempts = creates(sandbox, since)
    assert [r["idempotency_key"] for r in attempts] == [sub.create_idempotency_key] * 2
    assert [(r["status"], r["dropped"], r["idempotent_replay"]) for r in attempts] == \
        [(None, True, False), (201, False, True)]


def test_a_key_past_the_replay_window_gives_way_to_a_fresh_endpoint(client, app_ctx, sandbox,
                                                                    monkeypatch):
    operator_id, stora_operator = connect(client, sandbox)
    sandbox.admin("POST", "faults", json={"endpoint": "api", "mode": "drop_after_commit"})
    work(app_ctx, QUEUE_WEBHOOKS)
    [lost] = stora_endpoints(sandbox, stora_operator)
    old_key = subs(operator_id)[0].create_idempotency_key

    # As if the retry came more than a day later: Stora no longer replays the answer.
    monkeypatch.setattr(subscriptions, "REPLAY_WINDOW", timedelta(0))
    since = last_seq(sandbox)
    result = reconcile(operator_id)

    sub = active(operator_id)
    endpoints = by_id(stora_endpoints(sandbox, stora_operator))
    assert endpoints[lost["id"]]["status"] == "disabled"  # nobody holds its secret
    assert sub.stora_endpoint_id != lost["id"] and sub.create_idempotency_key != old_key
    assert endpoints[sub.stora_endpoint_id]["status"] == "enabled"
    assert subscription_secret(sub, vault=app_ctx.extensions["vault"]) == \
        endpoints[sub.stora_endpoint_id]["secret"]
    assert [r["idempotency_key"] for r in creates(sandbox, since)] == \
        [sub.create_idempotency_key]
    assert f"disabled endpoint {lost['id']} (secret lost with its answer)" in result["actions"]


def test_a_create_answered_with_a_server_error_retries_under_a_new_key(client, app_ctx,
                                                                       sandbox):
    operator_id, stora_operator = connect(client, sandbox)
    # Stora stores the error under the key and would replay it for 24 h.
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 500, "stored": True})
    since = last_seq(sandbox)
    with pytest.raises(ApiUnavailable):
        reconcile(operator_id)
    [sub] = subs(operator_id)
    assert sub.status == "pending" and sub.last_error.startswith("create failed: ApiUnavailable")
    reconcile(operator_id)
    sub = active(operator_id)
    assert len(stora_endpoints(sandbox, stora_operator)) == 1
    keys = [r["idempotency_key"] for r in creates(sandbox, since)]
    assert len(keys) == 2 and keys[0] != keys[1] == sub.create_idempotency_key


def test_a_rejected_create_fails_until_staff_retry_it(client, app_ctx, sandbox):
    operator_id, stora_operator = connect(client, sandbox)
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 422})
    reconcile(operator_id)
    [failed] = subs(operator_id)
    assert failed.status == "failed"
    assert failed.last_error.startswith("create rejected: RequestRejected 422")

    since = last_seq(sandbox)
    result = reconcile(operator_id)  # no new subscription that would fail the same way
    assert f"subscription {failed.id} failed; see its last_error" in result["actions"]
    assert creates(sandbox, since) == [] and len(subs(operator_id)) == 1

    outcome = app_ctx.test_cli_runner().invoke(
        cli, ["webhooks", "reconcile", "--operator", str(operator_id), "--retry-failed"])
    assert outcome.exit_code == 0, outcome.output
    assert [sub.status for sub in subs(operator_id)] == ["disabled", "active"]
    assert len(stora_endpoints(sandbox, stora_operator)) == 1


def test_concurrent_reconcilers_create_one_endpoint(client, app_ctx, sandbox):
    operator_id, stora_operator = connect(client, sandbox)
    since = last_seq(sandbox)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def one() -> None:
        with app_ctx.app_context():
            start.wait()
            try:
                subscriptions.reconcile_operator(operator_id)
            except BaseException as exc:  # 409 while the sibling's create is in flight
                errors.append(exc)
            finally:
                db.session.remove()

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(exc, subscriptions.CreateInProgress) for exc in errors), errors
    # Both sent the row's one key: Stora made one endpoint and replayed it to the other.
    attempts = creates(sandbox, since)
    assert len({r["idempotency_key"] for r in attempts}) == 1
    assert [r["idempotent_replay"] for r in attempts if r["status"] == 201][:1] == [False]
    reconcile(operator_id)
    sub = active(operator_id)
    assert len(subs(operator_id)) == 1
    assert [e["id"] for e in stora_endpoints(sandbox, stora_operator)] == [sub.stora_endpoint_id]


# -- drift ------------------------------------------------------------------------------------
def _disable_at_stora(operator_id: int, endpoint_id: str) -> None:
    """What an operator's staff (or Stora's auto-disable) does."""
    client_for(operator_id).request("POST", f"webhook_endpoints/{endpoint_id}/disable")
    db.session.commit()


def test_a_disabled_endpoint_is_replaced_and_a_backfill_starts(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    old = active(operator_id)
    _disable_at_stora(operator_id, old.stora_endpoint_id)
    since = last_seq(sandbox)
    assert reconcile_jobs.reconcile_all_webhooks() == {"operators": 1, "queued": 1, "closed": 0}
    work(app_ctx, QUEUE_WEBHOOKS)  # the cron's per-operator job

    enable = [r for r in sandbox.requests_log(since) if r["path"].endswith("/enable")]
    assert [r["status"] for r in enable] == [404]  # Stora has no enable call by default
    old_now, new = subs(operator_id)
    assert old_now.id == old.id and old_now.status == "retiring"
    assert old_now.last_error == "disabled at Stora; replaced"
    assert timedelta(minutes=59) < old_now.retire_after - datetime.now(UTC) <= timedelta(hours=1)
    assert new.status == "active" and new.route_key != old.route_key
    endpoints = by_id(stora_endpoints(sandbox, stora_operator))
    assert endpoints[new.stora_endpoint_id]["status"] == "enabled"
    assert endpoints[new.stora_endpoint_id]["secret"] != endpoints[old.stora_endpoint_id]["secret"]

    [run] = backfills(operator_id)
    work(app_ctx, QUEUE_SYNC, QUEUE_DEFAULT)
    db.session.rollback()
    assert db.session.get(SyncRun, run.id).status == "completed"
    assert db.session.scalar(select(SyncedOrder.id).limit(1)) is not None


def test_a_disabled_endpoint_is_enabled_again_when_stora_allows(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    sub = active(operator_id)
    sandbox.admin("PATCH", "config", json={"webhook_enable_endpoint": True})
    _disable_at_stora(operator_id, sub.stora_endpoint_id)
    result = reconcile(operator_id)
    assert f"enabled endpoint {sub.stora_endpoint_id} again" in result["actions"]
    assert [(s.id, s.status) for s in subs(operator_id)] == [(sub.id, "active")]
    assert [e["status"] for e in stora_endpoints(sandbox, stora_operator)] == ["enabled"]
    assert [run.id for run in backfills(operator_id)] == [result["backfill_run_id"]]


def test_a_missing_endpoint_is_created_again_and_the_stray_disabled(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    sub = active(operator_id)
    original = sub.stora_endpoint_id
    # Stora no longer knows the endpoint we recorded; the real one is now unaccounted for.
    db.session.execute(update(WebhookSubscription).values(stora_endpoint_id="we_0000000000000000"))
    db.session.commit()
    reconcile(operator_id)

    again = active(operator_id)
    assert again.id == sub.id and again.route_key == sub.route_key
    assert again.stora_endpoint_id not in (original, "we_0000000000000000")
    endpoints = by_id(stora_endpoints(sandbox, stora_operator))
    assert endpoints[original]["status"] == "disabled"  # a stray: we hold no secret for it
    assert endpoints[again.stora_endpoint_id]["status"] == "enabled"
    assert subscription_secret(again, vault=app_ctx.extensions["vault"]) == \
        endpoints[again.stora_endpoint_id]["secret"]
    assert len(backfills(operator_id)) == 1


def test_url_and_event_types_drift_is_patched_back(client, app_ctx, sandbox, settings):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    sub = active(operator_id)
    client_for(operator_id).request(
        "PATCH", f"webhook_endpoints/{sub.stora_endpoint_id}",
        json={"url": "http://127.0.0.1:5999/elsewhere",
              "event_types": ["order.created", "contact.updated"]})
    db.session.commit()
    result = reconcile(operator_id)
    assert result["actions"] == [f"updated event_types, url of endpoint {sub.stora_endpoint_id}"]
    [endpoint] = stora_endpoints(sandbox, stora_operator)
    assert endpoint["url"] == sub.url and endpoint["event_types"] == ["order.created"]
    assert endpoint["status"] == "enabled" and backfills(operator_id) == []


def test_an_unreadable_secret_is_replaced(client, app_ctx, sandbox):
    operator_id, _ = subscribe(app_ctx, client, sandbox)
    sub = active(operator_id)
    tampered = sub.secret_ct[:-8] + "AAAAAAAA"  # as after a lost data key: undecryptable
    db.session.execute(update(WebhookSubscription).values(secret_ct=tampered))
    db.session.commit()
    reconcile(operator_id)
    statuses = [(s.id == sub.id, s.status) for s in subs(operator_id)]
    assert statuses == [(True, "retiring"), (False, "active")]


# -- rotation -------------------------------------------------------------------------------
def test_rotation_overlap_both_verify_their_own_then_only_the_new(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    old = active(operator_id)
    reconcile_jobs.enqueue_rotation(operator_id)
    work(app_ctx, QUEUE_WEBHOOKS)
    retiring, new = subs(operator_id)
    assert (retiring.id, retiring.status, new.status) == (old.id, "retiring", "active")
    endpoints = by_id(stora_endpoints(sandbox, stora_operator))
    assert [endpoints[s.stora_endpoint_id]["status"] for s in (retiring, new)] == \
        ["enabled", "enabled"]
    old_secret = endpoints[retiring.stora_endpoint_id]["secret"]
    new_secret = endpoints[new.stora_endpoint_id]["secret"]
    assert backfills(operator_id) == []  # nothing was missed

    # During the overlap each URL takes deliveries signed with its own endpoint's secret;
    # the same event through both is stored once.
    body = envelope("evt_rotation_1")
    assert deliver(client, retiring.route_key, old_secret, body).json["duplicate"] is False
    assert deliver(client, new.route_key, new_secret, body).json["duplicate"] is True
    assert deliver(client, new.route_key, old_secret, body).status_code == 401
    assert deliver(client, retiring.route_key, new_secret, body).status_code == 401
    db.session.rollback()
    assert db.session.scalars(select(WebhookEvent.deliveries)).all() == [2]

    # After retire_after only the new one verifies; the reconciler disables the old one.
    db.session.execute(update(WebhookSubscription).where(WebhookSubscription.id == old.id)
                       .values(retire_after=datetime.now(UTC) - timedelta(seconds=1)))
    db.session.commit()
    later = envelope("evt_rotation_2")
    assert deliver(client, retiring.route_key, old_secret, later).status_code == 404
    assert deliver(client, new.route_key, new_secret, later).status_code == 200
    assert f"retired subscription {old.id}" in reconcile(operator_id)["actions"]
    retired, new = subs(operator_id)
    assert (retired.status, retired.secret_ct, new.status) == ("disabled", None, "active")
    endpoints = by_id(stora_endpoints(sandbox, stora_operator))
    assert endpoints[retired.stora_endpoint_id]["status"] == "disabled"
    assert endpoints[new.stora_endpoint_id]["status"] == "enabled"


# -- disconnect, reauth -------------------------------------------------------------------------
def _disconnect(app, operator_id: int, **kwargs):
    result = disconnect_operator(db.session.get(Operator, operator_id),
                                 vault=app.extensions["vault"],
                                 oauth=app.extensions["stora_oauth"], now=datetime.now(UTC),
                                 actor_type="staff", actor="test@partner.example", **kwargs)
    db.session.commit()
    return result


def test_disconnect_disables_endpoints_at_stora_before_revoking(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    subscriptions.rotate_secret(operator_id)  # two live endpoints: retiring and active
    since = last_seq(sandbox)
    result = _disconnect(app_ctx, operator_id)

    assert result.revoked_at_stora
    assert [e["status"] for e in stora_endpoints(sandbox, stora_operator)] == ["disabled"] * 2
    paths = [r["path"] for r in sandbox.requests_log(since)]
    assert paths.index("/oauth2/revoke") > max(
        i for i, path in enumerate(paths) if path.endswith("/disable"))
    assert [(s.status, s.secret_ct) for s in subs(operator_id)] == [("disabled", None)] * 2
    entry = db.session.scalars(select(AuditEntry).where(
        AuditEntry.action == "operator.disconnected")).one()
    assert entry.detail["webhook_endpoints_disabled"] == 2


def test_disconnect_while_stora_is_unreachable_changes_nothing(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 503, "count": -1})
    since = last_seq(sandbox)
    with pytest.raises(DisconnectFailed) as failed:
        _disconnect(app_ctx, operator_id)
    db.session.rollback()
    assert failed.value.reason == "stora_unavailable"
    assert "/oauth2/revoke" not in [r["path"] for r in sandbox.requests_log(since)]
    assert db.session.get(Operator, operator_id).status == "active"
    assert db.session.scalar(select(Credential.id)) is not None
    assert active(operator_id).secret_ct is not None
    assert [e["status"] for e in stora_endpoints(sandbox, stora_operator)] == ["enabled"]


def test_needs_reauth_closes_locally_and_a_reconnect_starts_over(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    old = active(operator_id)
    sandbox.admin("POST", f"operators/{stora_operator}/revoke_tokens")
    db.session.execute(update(Operator).values(status=OperatorStatus.NEEDS_REAUTH))
    db.session.commit()
    since = last_seq(sandbox)
    assert reconcile_jobs.reconcile_all_webhooks() == {"operators": 0, "queued": 0, "closed": 1}
    assert sandbox.requests_log(since) == []  # nothing to call: the grant is gone
    [closed] = subs(operator_id)
    assert (closed.status, closed.secret_ct) == ("disabled", None)
    assert deliver(client, old.route_key, "0" * 64, envelope("evt_x")).status_code == 404

    # Reconnect: a new subscription; the old endpoint, still enabled at Stora and
    # delivering to a closed route, is disabled; what was refused meanwhile is backfilled.
    install(client, LEEDS)
    work(app_ctx, QUEUE_WEBHOOKS)
    new = active(operator_id)
    endpoints = by_id(stora_endpoints(sandbox, stora_operator))
    assert endpoints[old.stora_endpoint_id]["status"] == "disabled"
    assert endpoints[new.stora_endpoint_id]["status"] == "enabled"
    assert len(backfills(operator_id)) == 1


def test_operators_are_isolated(client, app_ctx, sandbox):
    leeds, leeds_stora = subscribe(app_ctx, client, sandbox, LEEDS)
    bristol, bristol_stora = subscribe(app_ctx, client, sandbox, BRISTOL)
    leeds_sub, bristol_sub = active(leeds), active(bristol)
    secret = stora_endpoints(sandbox, leeds_stora)[0]["secret"]
    body = envelope("evt_isolated")
    # Bristol's URL does not accept Leeds's signature, and the event lands on Leeds only.
    assert deliver(client, bristol_sub.route_key, secret, body).status_code == 401
    assert deliver(client, leeds_sub.route_key, secret, body).status_code == 200
    db.session.rollback()
    assert db.session.scalars(select(WebhookEvent.operator_id)).all() == [leeds]
    assert len(stora_endpoints(sandbox, bristol_stora)) == 1


# -- cron and CLI ----------------------------------------------------------------------------
def test_cron_schedules_the_reconciler_and_the_inbox_sweeper(app_ctx):
    scheduler = build_scheduler(get_redis(app_ctx), orders_every=timedelta(minutes=15),
                                sweep_every=timedelta(minutes=1),
                                refresh_every=timedelta(minutes=5), name="webhooks-test")
    jobs = {job.func_name: job for job in scheduler.get_jobs()}
    assert jobs["partner_app.webhooks.reconcile_jobs.reconcile_all_webhooks"].interval == 600
    assert jobs["partner_app.webhooks.jobs.sweep_inbox"].interval == 60


def test_cli_lists_without_route_keys_reconciles_rotates_and_replays(client, app_ctx, sandbox):
    operator_id, stora_operator = subscribe(app_ctx, client, sandbox)
    public_id = db.session.get(Operator, operator_id).public_id
    runner = app_ctx.test_cli_runner()
    sub = active(operator_id)

    listing = runner.invoke(cli, ["webhooks", "list", "--operator", public_id])
    assert listing.exit_code == 0, listing.output
    assert f"/webhooks/stora/{sub.route_key[:6]}…" in listing.output
    assert sub.route_key not in listing.output and "active" in listing.output

    rotated = runner.invoke(cli, ["webhooks", "rotate", public_id])
    assert rotated.exit_code == 0, rotated.output
    assert "retiring" in rotated.output
    assert [s.status for s in subs(operator_id)] == ["retiring", "active"]

    queued = runner.invoke(cli, ["webhooks", "reconcile"])
    assert queued.exit_code == 0 and "queued 1 reconcile job(s)" in queued.output

    secret = stora_endpoints(sandbox, stora_operator)[-1]["secret"]
    assert deliver(client, active(operator_id).route_key, secret,
                   envelope("evt_cli")).status_code == 200
    work(app_ctx, QUEUE_WEBHOOKS, QUEUE_DEFAULT)
    event_id = db.session.scalar(select(WebhookEvent.id))
    replayed = runner.invoke(cli, ["webhooks", "replay", str(event_id)])
    assert replayed.exit_code == 0 and f"queued replay of event {event_id}" in replayed.output
    work(app_ctx, QUEUE_WEBHOOKS, QUEUE_DEFAULT)
    db.session.rollback()
    event = db.session.get(WebhookEvent, event_id)
    assert (event.status, event.attempts) == ("processed", 2)
    assert runner.invoke(cli, ["webhooks", "replay", "999999"]).exit_code == 1
