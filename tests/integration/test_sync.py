"""Orders sync against the real sandbox: the backfill walk, upserts, the fan-out over
every operator with real forking RQ workers, per-operator failure isolation, skips,
duplicate-proof enqueueing and delivery, per-operator concurrency and rate-limit waits.

Helpers here are shared by the other ``test_sync*`` and ``test_timeline*`` modules.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from rq import Queue
from rq.job import Job
from rq.rate_limit import RateLimitRegistry
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from sqlalchemy import func, select, update

from partner_app.connections.credentials import store_token_set
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.db import db
from partner_app.queueing import QUEUE_DEFAULT, QUEUE_SYNC, get_queue, get_redis
from partner_app.stora.errors import RateLimitWait
from partner_app.sync import jobs as sync_jobs
from partner_app.sync import orders as sync_orders
from partner_app.sync.models import SyncCursor, SyncedOrder, SyncRun, SyncRunItem
from partner_app.sync.services import start_sync
from tests.integration.test_install_flow import install
from workers.app_worker import AppWorker, prepare_for_fork

EXAMPLE = Path(__file__).resolve().parent.parent / "data" / "order-created-webhook.raw.json"

ORDERS_PATH = "/2025-09/orders"


# -- helpers --------------------------------------------------------------------------------
def sandbox_operator(sandbox, name: str) -> dict:
    return next(op for op in sandbox.operators() if op["name"] == name)


def connect_seeded(client, sandbox) -> list[str]:
    """Connect every operator the sandbox offers through the install flow."""
    names = [op["name"] for op in sandbox.operators()]
    for name in names:
        install(client, name)
    return names


def connect_direct(app, sandbox, sandbox_operator_id: str, *,
                   scopes: tuple[str, ...] | None = None) -> int:
    """Authorize over HTTP (no consent page), exchange the code with our OAuth client
    and store the tokens with the real ``store_token_set``. Returns our operator id."""
    settings = app.extensions["settings"]
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    resp = requests.post(f"{sandbox.base_url}/oauth2/authorize", allow_redirects=False,
                         timeout=10, data={
                             "response_type": "code", "client_id": settings.stora_client_id,
                             "redirect_uri": settings.redirect_uri, "state": "direct",
                             "scope": " ".join(scopes or settings.stora_scopes),
                             "code_challenge": challenge, "code_challenge_method": "S256",
                             "operator_id": sandbox_operator_id, "decision": "approve"})
    assert resp.status_code == 302, resp.text
    code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    oauth = app.extensions["stora_oauth"]
    tokens = oauth.exchange_code(code=code, code_verifier=verifier)
    info = oauth.token_info(tokens.access_token)
    now = datetime.now(UTC)
    operator = Operator(stora_identity=info.identity, name=info.operator_name,
                        status=OperatorStatus.ACTIVE, scopes=tokens.scope, connected_at=now)
    db.session.add(operator)
    db.session.flush()
    store_token_set(operator, tokens, vault=app.extensions["vault"], now=now)
    db.session.commit()
    return operator.id


def new_sandbox_operator(sandbox, name: str, *, orders: int = 0, sites: int = 1) -> dict:
    return sandbox.admin("POST", "operators",
                         json={"name": name, "orders": orders, "sites": sites, "contacts": 5})


_FORK_SAFE: set[int] = set()


def work(app, *queues: str) -> None:
    """Run a real forking worker until the queues are empty (as ``partner-app worker``
    does: no pooled database connection crosses into a work-horse)."""
    if id(app) not in _FORK_SAFE:
        prepare_for_fork(app)
        _FORK_SAFE.add(id(app))
    names = queues or (QUEUE_SYNC, QUEUE_DEFAULT)
    worker = AppWorker([get_queue(name, app) for name in names], connection=get_redis(app),
                       app=app)
    worker.work(burst=True, with_scheduler=False)


def release_scheduled(app, monkeypatch, *, ahead: float = 3600,
                      queues: tuple[str, ...] = (QUEUE_SYNC, QUEUE_DEFAULT)) -> None:
    """What RQ's scheduler does once the scheduled time has come, done now."""
    scheduler = RQScheduler(list(queues), connection=get_redis(app), serializer=JSONSerializer)
    scheduler.prepare_registries(list(queues))
    with monkeypatch.context() as patch:
        patch.setattr("rq.scheduler.current_timestamp", lambda: time.time() + ahead)
        scheduler.enqueue_scheduled_jobs()


def order_requests(sandbox, since: int = 0) -> list[dict]:
    return [r for r in sandbox.requests_log(since) if r["path"] == ORDERS_PATH]


def last_seq(sandbox) -> int:
    log = sandbox.requests_log()
    return log[-1]["seq"] if log else 0


def mirror_count(operator_id: int) -> int:
    return db.session.scalar(select(func.count()).select_from(SyncedOrder)
                             .where(SyncedOrder.operator_id == operator_id))


def our_operator(name: str) -> Operator:
    return db.session.scalars(select(Operator).where(Operator.name == name)).one()


def run_state(run_id: int) -> SyncRun:
    db.session.expire_all()
    return db.session.get(SyncRun, run_id)


def items_by_operator(run_id: int) -> dict[int, SyncRunItem]:
    db.session.expire_all()
    return {item.operator_id: item for item in db.session.scalars(
        select(SyncRunItem).where(SyncRunItem.run_id == run_id))}


def commit_run(**kwargs) -> int:
    run = start_sync("orders", requested_by="test", record_timeline=False, **kwargs)
    db.session.commit()
    return run.id


# -- the backfill walk ----------------------------------------------------------------------
class Killed(Exception):
    """Stands for the process dying right after a page committed."""


def test_backfill_pages_through_and_resumes_from_the_cursor(client, app_ctx, sandbox):
    name = connect_seeded(client, sandbox)[0]
    expected = sandbox_operator(sandbox, name)["orders"]
    operator = our_operator(name)
    api = sync_jobs.client_for(operator.id)
    pages_seen = []

    def dies_after_two(page: sync_orders.PageDone) -> None:
        db.session.commit()
        pages_seen.append(page)
        if len(pages_seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        sync_orders.backfill_orders(api, operator.id, checkpoint=dies_after_two, page_size=25)
    db.session.rollback()
    # Two pages committed; the second re-read the first one's newest record(s).
    committed = sum(sum(page.new_by_site.values()) for page in pages_seen)
    assert 25 < committed <= 50 and mirror_count(operator.id) == committed
    cursor = db.session.scalars(select(SyncCursor)).one()
    assert cursor.watermark is not None and cursor.page == 1 and cursor.last_success_at is None

    since = last_seq(sandbox)
    result = sync_orders.backfill_orders(api, operator.id, checkpoint=lambda _: db.session.commit(),
                                         page_size=25)
    assert result.complete
    assert mirror_count(operator.id) == expected
    # Resumed at the watermark: only the remaining pages (plus the one-record overlap).
    remaining = expected - committed
    assert len(order_requests(sandbox, since)) <= math.ceil(remaining / 24) + 1
    ids = db.session.scalars(select(SyncedOrder.stora_id)).all()
    assert len(ids) == len(set(ids)) == expected


def test_a_run_of_equal_timestamps_longer_than_a_page(client, app_ctx, sandbox):
    created = new_sandbox_operator(sandbox, "Same Second Storage")
    sandbox.admin("POST", f"operators/{created['id']}/orders", json={"count": 60})
    operator_id = connect_direct(app_ctx, sandbox, created["id"])
    api = sync_jobs.client_for(operator_id)
    result = sync_orders.backfill_orders(api, operator_id, page_size=25,
                                         checkpoint=lambda _: db.session.commit())
    assert result.complete and result.pages == 3
    assert mirror_count(operator_id) == 60
    # Later orders land behind the run of equal timestamps and are still found.
    time.sleep(1.1)
    sandbox.admin("POST", f"operators/{created['id']}/orders", json={"count": 3})
    sync_orders.backfill_orders(api, operator_id, page_size=25,
                                checkpoint=lambda _: db.session.commit())
    assert mirror_count(operator_id) == 63


def test_upserts_are_idempotent_and_follow_updates(client, app_ctx, sandbox):
    name = connect_seeded(client, sandbox)[0]
    operator = our_operator(name)
    api = sync_jobs.client_for(operator.id)
    first = sync_orders.backfill_orders(api, operator.id, checkpoint=lambda _: db.session.commit())
    before = {row.stora_id: row.first_synced_at for row in db.session.scalars(select(SyncedOrder))}
    assert first.new_records == len(before)

    # From scratch again (cursor dropped): same rows, nothing new, first_synced_at kept.
    db.session.execute(SyncCursor.__table__.delete())
    db.session.commit()
    again = sync_orders.backfill_orders(api, operator.id, checkpoint=lambda _: db.session.commit())
    assert again.new_records == 0 and again.records >= len(before)  # overlap re-reads
    db.session.expire_all()
    after = {row.stora_id: row.first_synced_at for row in db.session.scalars(select(SyncedOrder))}
    assert after == before

    changed = next(iter(before))
    sandbox.admin("PATCH", f"orders/{changed}", json={"status": "cancelled"})
    since = last_seq(sandbox)
    sync_orders.backfill_orders(api, operator.id, checkpoint=lambda _: db.session.commit())
    assert len(order_requests(sandbox, since)) == 1  # from the cursor, one page
    db.session.expire_all()
    row = db.session.scalars(select(SyncedOrder).where(SyncedOrder.stora_id == changed)).one()
    assert row.status == "cancelled" and row.payload["status"] == "cancelled"
    assert mirror_count(operator.id) == len(before)


def test_a_stale_copy_never_overwrites_a_newer_row(app_ctx):
    operator = Operator(name="x", status=OperatorStatus.ACTIVE)
    db.session.add(operator)
    db.session.flush()
    now = datetime.now(UTC)
    newer = {"id": "order_1", "status": "completed", "updated_at": "2025-05-02T00:00:00Z",
             "total": {"amount": 100, "currency": "GBP"}}
    older = {**newer, "status": "draft", "updated_at": "2025-05-01T00:00:00Z"}
    assert sync_orders.upsert_orders(operator.id, [newer], now=now) == {"": 1}
    assert sync_orders.upsert_orders(operator.id, [older], now=now) == {}
    db.session.commit()
    row = db.session.scalars(select(SyncedOrder)).one()
    assert (row.status, row.total_amount, row.currency) == ("completed", 100, "GBP")


def test_each_order_is_stored_exactly_as_stora_sent_it(app_ctx):
    """The page travels as one JSON text; every order's payload must come back equal,
    whatever it holds (Stora's documented example, plus text JSON must escape)."""
    example = json.loads(EXAMPLE.read_bytes())["event"]["data"]["order"]
    odd = {**example, "id": "order_odd", "updated_at": "2025-05-03T00:00:00Z",
           "notes": 'Caf\u00e9 \u2013 "bay 7"\\back\nslash \U0001f4e6',
           "nested": {"a": [1, 2.5, None, True, {"b": ""}]}, "big": 2 ** 53 + 1}
    orders = [{**example, "id": f"order_{n}"} for n in range(3)] + [odd]
    operator = Operator(name="x", status=OperatorStatus.ACTIVE)
    db.session.add(operator)
    db.session.flush()
    sync_orders.upsert_orders(operator.id, orders, now=datetime.now(UTC))
    db.session.commit()
    db.session.expire_all()
    stored = {row.stora_id: row.payload for row in db.session.scalars(select(SyncedOrder))}
    assert stored == {order["id"]: order for order in orders}


# -- fan-out through real workers -----------------------------------------------------------
def test_fan_out_syncs_every_operator(client, app_ctx, sandbox):
    names = connect_seeded(client, sandbox)
    for index in range(2):
        created = new_sandbox_operator(sandbox, f"Extra Storage {index}", orders=130)
        connect_direct(app_ctx, sandbox, created["id"])
        names.append(created["name"])
    run_id = commit_run()
    work(app_ctx)
    run = run_state(run_id)
    assert (run.status, run.total, run.succeeded, run.failed) == ("completed", 5, 5, 0)
    assert run.finished_at is not None and run.fanned_out_at is not None
    for name in names:
        operator = our_operator(name)
        assert mirror_count(operator.id) == sandbox_operator(sandbox, name)["orders"]
    items = items_by_operator(run_id).values()
    assert all(item.attempts == 1 and item.pages >= 2 for item in items)


def test_failures_are_isolated_per_operator(client, app_ctx, sandbox, monkeypatch):
    names = connect_seeded(client, sandbox)
    created = new_sandbox_operator(sandbox, "No Order Scope Ltd", orders=10)
    settings = app_ctx.extensions["settings"]
    narrow = tuple(s for s in settings.stora_scopes if s != "public.order:read")
    forbidden_id = connect_direct(app_ctx, sandbox, created["id"], scopes=narrow)
    first_id = our_operator(names[0]).id
    run_id = commit_run()
    # The first job's first call meets a 503: that job retries, the others go on.
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 503, "count": 1})
    work(app_ctx)
    items = items_by_operator(run_id)
    assert items[first_id].status == "queued" and "ApiUnavailable 503" in items[first_id].error
    assert items[forbidden_id].status == "failed"
    assert items[forbidden_id].error.startswith("Forbidden 403 forbidden")
    assert sum(item.status == "succeeded" for item in items.values()) == 2
    assert run_state(run_id).status == "running"

    release_scheduled(app_ctx, monkeypatch)
    work(app_ctx)
    items = items_by_operator(run_id)
    assert items[first_id].status == "succeeded" and items[first_id].attempts == 2
    assert items[forbidden_id].attempts == 1  # permanent: never retried
    run = run_state(run_id)
    assert (run.status, run.succeeded, run.failed) == ("completed_with_failures", 3, 1)
    assert mirror_count(first_id) == sandbox_operator(sandbox, names[0])["orders"]


def test_disconnected_and_revoked_operators_are_skipped(client, app_ctx, sandbox):
    names = connect_seeded(client, sandbox)
    run_id = commit_run()
    gone, revoked, fine = (our_operator(name) for name in names)
    gone.status = OperatorStatus.DISCONNECTED
    db.session.commit()
    sandbox.admin("POST", f"operators/{sandbox_operator(sandbox, revoked.name)['id']}"
                  "/revoke_tokens")
    work(app_ctx)
    items = items_by_operator(run_id)
    assert items[gone.id].status == "skipped" and items[gone.id].error == "operator is disconnected"
    assert items[revoked.id].status == "skipped"
    assert items[revoked.id].error.startswith("operator became needs_reauth")
    assert items[fine.id].status == "succeeded"
    run = run_state(run_id)
    assert (run.status, run.succeeded, run.skipped) == ("completed", 1, 2)
    # A later all-operator run leaves out the operators that cannot be synced.
    assert db.session.get(SyncRun, commit_run()).total == 1


def _job_occurrences(app, job_ids: list[str]) -> dict[str, int]:
    connection = get_redis(app)
    queue = get_queue(QUEUE_SYNC, app)
    waiting = queue.get_job_ids()
    counts = {one: waiting.count(one) for one in job_ids}
    for key in {Job.fetch(one, connection=connection, serializer=JSONSerializer).rate_limit_key
                for one in job_ids}:
        registry = RateLimitRegistry(key, connection)
        for one in registry.get_rate_limited_job_ids():
            if one in counts:
                counts[one] += 1
    return counts


def test_deterministic_ids_stop_duplicate_enqueues_and_deliveries(client, app_ctx, sandbox):
    names = connect_seeded(client, sandbox)
    run_id = commit_run()
    assert sync_jobs.fan_out(run_id) == {"enqueued": 3}
    assert sync_jobs.fan_out(run_id) == {"enqueued": 0}
    # A parent that died after the Redis write but before marking the items enqueued.
    db.session.execute(update(SyncRunItem).values(enqueued_at=None))
    db.session.commit()
    assert sync_jobs.fan_out(run_id) == {"enqueued": 0}
    ids = [sync_jobs.job_id(run_id, our_operator(name).id) for name in names]
    assert _job_occurrences(app_ctx, ids) == dict.fromkeys(ids, 1)

    # For contrast (reliability.md §6): enqueue_many itself does not deduplicate.
    plain = Queue("dup-demo", connection=get_redis(app_ctx), serializer=JSONSerializer)
    for _ in range(2):
        plain.enqueue_many([Queue.prepare_data("builtins.print", job_id="same-id")])
    assert plain.get_job_ids() == ["same-id", "same-id"]
    plain.empty()

    work(app_ctx, QUEUE_SYNC)
    assert run_state(run_id).status == "completed"
    since = last_seq(sandbox)
    first = our_operator(names[0])
    # A duplicate delivery of a finished item finds nothing to claim and calls nobody.
    assert sync_jobs.sync_operator(run_id, first.id) == {"claimed": False}
    assert order_requests(sandbox, since) == []
    assert items_by_operator(run_id)[first.id].attempts == 1


def test_one_operator_never_has_two_jobs_in_flight(client, app_ctx, sandbox):
    name = connect_seeded(client, sandbox)[0]
    operator = our_operator(name)
    first, second = commit_run(operator_id=operator.id), commit_run(operator_id=operator.id)
    sync_jobs.fan_out(first)
    sync_jobs.fan_out(second)
    registry = RateLimitRegistry(f"operator:{operator.id}", get_redis(app_ctx))
    assert registry.get_allowed_job_ids() == [sync_jobs.job_id(first, operator.id)]
    assert registry.get_rate_limited_job_ids() == [sync_jobs.job_id(second, operator.id)]
    since = last_seq(sandbox)
    work(app_ctx, QUEUE_SYNC)
    assert run_state(first).status == run_state(second).status == "completed"
    # The second run starts at the first one's watermark: it re-reads only the orders
    # sharing the newest timestamp, in one request.
    newest = db.session.scalar(select(func.max(SyncedOrder.stora_updated_at)))
    at_newest = db.session.scalar(select(func.count()).select_from(SyncedOrder)
                                  .where(SyncedOrder.stora_updated_at == newest))
    assert items_by_operator(second)[operator.id].records == at_newest
    assert len(order_requests(sandbox, since)) == 3  # two pages, then one from the cursor


class WaitOnce:
    """A RateLimiter that makes the first call wait (state in Redis: horses fork)."""

    def __init__(self, app, seconds: float):
        self.redis = get_redis(app)
        self.seconds = seconds

    def acquire(self, key: str, *, kind: str = "api") -> None:
        if self.redis.delete("test:limiter:wait-once"):
            raise RateLimitWait(f"{key}: wait", retry_after=self.seconds)

    def backoff(self, key: str, seconds: float) -> None:
        pass


def test_rate_limit_wait_reschedules_without_spending_a_retry(client, app_ctx, sandbox,
                                                              monkeypatch):
    from partner_app.stora.client import StoraClient

    name = connect_seeded(client, sandbox)[0]
    operator = our_operator(name)
    limiter = WaitOnce(app_ctx, seconds=30)
    real_client_for = sync_jobs.client_for

    def limited_client(operator_id: int) -> StoraClient:
        base = real_client_for(operator_id)
        return StoraClient(api_base=base.api_base, tokens=base._tokens, limiter=limiter,
                           limiter_key=f"operator:{operator_id}")

    monkeypatch.setattr(sync_jobs, "client_for", limited_client)
    get_redis(app_ctx).set("test:limiter:wait-once", 1)
    run_id = commit_run(operator_id=operator.id)
    since = last_seq(sandbox)
    work(app_ctx, QUEUE_SYNC)

    job = Job.fetch(sync_jobs.job_id(run_id, operator.id), connection=get_redis(app_ctx),
                    serializer=JSONSerializer)
    assert job.get_status() == "scheduled"
    assert job.retries_left == sync_jobs.SYNC_RETRY.max and job.number_of_retries == 1
    registry = ScheduledJobRegistry(queue=get_queue(QUEUE_SYNC, app_ctx))
    due = registry.get_scheduled_time(job.id).timestamp() - time.time()
    assert 25 < due < 34
    item = items_by_operator(run_id)[operator.id]
    assert item.status == "queued" and item.error.startswith("waiting 3")
    assert order_requests(sandbox, since) == []

    release_scheduled(app_ctx, monkeypatch, queues=(QUEUE_SYNC,))
    work(app_ctx, QUEUE_SYNC)
    item = items_by_operator(run_id)[operator.id]
    assert (item.status, item.attempts) == ("succeeded", 2)
    assert mirror_count(operator.id) == sandbox_operator(sandbox, name)["orders"]
