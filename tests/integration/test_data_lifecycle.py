"""The data lifecycle: purging an operator (disconnect now, delete its mirror data on
schedule, a deletion record for the partner) and retention for the inbox and audit log.

Real PostgreSQL or SQLite, real Redis, the real sandbox and real forking RQ workers;
time moves by passing ``now`` to the services, as the cron's clock would.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from partner_app import audit
from partner_app.audit import AuditEntry
from partner_app.cli import cli
from partner_app.connections.disconnect import DisconnectFailed
from partner_app.connections.models import Credential, Operator
from partner_app.db import db, utcnow
from partner_app.lifecycle.jobs import enforce_retention
from partner_app.lifecycle.models import DeletionRecord
from partner_app.lifecycle.purge import purge_operator
from partner_app.lifecycle.retention import (
    LOCK_KEY,
    MIRROR_MODELS,
    RetentionBusy,
    pending_deletions,
    run_retention,
)
from partner_app.lifecycle.settings import RetentionSettings
from partner_app.queueing import QUEUE_DEFAULT, get_queue, get_redis
from partner_app.security.models import DataKey
from partner_app.settings import ConfigError, Settings
from partner_app.webhooks.models import WebhookEvent
from tests.integration.test_install_flow import BRISTOL, LEEDS, install
from tests.integration.test_sync import commit_run, mirror_count, our_operator, work
from workers.cron import build_scheduler

RETENTION = RetentionSettings(inbox_days=30, audit_days=365, purge_days=30)


def _mirror_counts(operator_id: int) -> dict[str, int]:
    return {model.__tablename__: db.session.scalar(
        select(func.count()).select_from(model).where(model.operator_id == operator_id))
        for model in MIRROR_MODELS}


def _inbox_event(operator_id: int, event_id: str, *, status: str, age: timedelta) -> None:
    when = utcnow() - age
    db.session.add(WebhookEvent(operator_id=operator_id, event_id=event_id,
                                event_type="order.created", status=status, signed_at=when,
                                received_at=when, body="{}", headers={}))


def _two_synced_operators(client, app) -> tuple[Operator, Operator]:
    """Leeds and Bristol connected, their orders synced, a few inbox events each."""
    install(client, LEEDS)
    install(client, BRISTOL)
    get_queue(QUEUE_DEFAULT).empty()
    commit_run()
    work(app)
    leeds, bristol = our_operator(LEEDS), our_operator(BRISTOL)
    for operator in (leeds, bristol):
        for n in range(3):
            _inbox_event(operator.id, f"evt_{operator.id}_{n}", status="processed",
                         age=timedelta(hours=1))
    db.session.commit()
    assert mirror_count(leeds.id) > 0 and mirror_count(bristol.id) > 0
    return leeds, bristol


def _purge(app, operator, *, now=None, **kwargs):
    result = purge_operator(operator, vault=app.extensions["vault"],
                            oauth=app.extensions["stora_oauth"], retention=RETENTION,
                            now=now or utcnow(), actor_type="staff",
                            actor="dpo@partner.example", **kwargs)
    db.session.commit()
    return result


def _retention(app, now, settings=RETENTION, **kwargs):
    return run_retention(redis=get_redis(app), settings=settings, now=now,
                         actor_type="system", actor="test", commit=db.session.commit,
                         **kwargs)


def test_purge_disconnects_at_once_and_deletes_mirror_data_after_the_grace(
        client, app_ctx, sandbox):
    leeds, bristol = _two_synced_operators(client, app_ctx)
    leeds_id, leeds_ref = leeds.id, leeds.public_id
    before = _mirror_counts(leeds_id)
    bristol_before = _mirror_counts(bristol.id)
    assert before["synced_orders"] > 0 and before["webhook_events"] == 3
    assert before["sync_run_items"] == 1 and before["sync_cursors"] == 1
    purged_at = utcnow()

    result = _purge(app_ctx, leeds, now=purged_at)
    assert result.revoked_at_stora and result.destroyed_keys == 1
    assert not result.already_scheduled
    # At once: tokens revoked, endpoints disabled, key destroyed; data still there.
    db.session.expire_all()
    assert db.session.get(Operator, leeds_id).status == "disconnected"
    assert db.session.scalar(select(func.count()).select_from(Credential)
                             .where(Credential.operator_id == leeds_id)) == 0
    key = db.session.scalars(select(DataKey).where(DataKey.operator_id == leeds_id)).one()
    assert key.wrapped_key is None and key.destroyed_at is not None
    assert [r["status"] for r in sandbox.requests_log() if r["path"] == "/oauth2/revoke"] \
        == [200]
    record = db.session.scalars(select(DeletionRecord)).one()
    assert (record.scope, record.status, record.operator_ref) == (
        "operator_purge", "scheduled", leeds_ref)
    assert record.delete_after == purged_at + timedelta(days=30)
    assert record.requested_by == "dpo@partner.example" and record.counts == {}
    assert _mirror_counts(leeds_id) == before
    # Purging again changes nothing and keeps the date.
    again = _purge(app_ctx, db.session.get(Operator, leeds_id), now=purged_at + timedelta(1))
    assert again.already_scheduled and again.record.id == record.id

    # Inside the grace: nothing of Leeds goes.
    early = _retention(app_ctx, purged_at + timedelta(days=29))
    assert early.purges_completed == [] and _mirror_counts(leeds_id) == before

    # After it: every mirror row of Leeds goes, Bristol keeps everything (its inbox
    # events are kept longer than the grace here, to tell the two apart).
    report = _retention(app_ctx, purged_at + timedelta(days=30, seconds=1),
                        RetentionSettings(inbox_days=90, purge_days=30))
    assert report.purges_completed == [leeds_ref]
    db.session.expire_all()
    assert set(_mirror_counts(leeds_id).values()) == {0}
    assert _mirror_counts(bristol.id) == bristol_before
    record = db.session.get(DeletionRecord, record.id)
    assert record.status == "completed" and record.completed_at is not None
    assert record.counts == {table: n for table, n in before.items() if n}
    tombstone = db.session.get(Operator, leeds_id)
    assert tombstone.public_id == leeds_ref and tombstone.name is None
    assert tombstone.storefront_host is None and tombstone.stora_identity is None
    actions = db.session.scalars(select(AuditEntry.action)
                                 .where(AuditEntry.operator_id == leeds_id)).all()
    assert {"operator.disconnected", "operator.purge_scheduled", "operator.purged"} \
        <= set(actions)
    # The record names the operator only by its public id: no personal data.
    assert LEEDS not in repr((record.counts, record.detail, record.operator_ref))
    # A purge already carried out is not scheduled a second time.
    assert _purge(app_ctx, tombstone).record.id == record.id


def test_a_reconnect_within_the_grace_cancels_the_deletion(client, app_ctx, sandbox):
    leeds, _bristol = _two_synced_operators(client, app_ctx)
    leeds_id = leeds.id
    before = _mirror_counts(leeds_id)
    purged_at = utcnow()
    _purge(app_ctx, leeds, now=purged_at)
    install(client, LEEDS)  # the operator comes back: same tenant
    db.session.expire_all()
    assert db.session.get(Operator, leeds_id).status == "active"

    report = _retention(app_ctx, purged_at + timedelta(days=31),
                        RetentionSettings(inbox_days=90, purge_days=30))
    assert report.purges_cancelled == [leeds.public_id]
    assert _mirror_counts(leeds_id) == before
    record = db.session.scalars(select(DeletionRecord)).one()
    assert record.status == "cancelled" and "active" in record.detail["cancelled_because"]
    # A second purge after the reconnect schedules a new deletion.
    fresh = _purge(app_ctx, db.session.get(Operator, leeds_id))
    assert not fresh.already_scheduled and fresh.record.id != record.id


def test_purge_while_stora_is_down_changes_nothing(client, app_ctx, sandbox):
    install(client, LEEDS)
    leeds = our_operator(LEEDS)
    sandbox.admin("POST", "faults", json={"endpoint": "revoke", "status": 503, "count": -1})
    with pytest.raises(DisconnectFailed):
        _purge(app_ctx, leeds)
    db.session.rollback()
    assert db.session.get(Operator, leeds.id).status == "active"
    assert db.session.scalar(select(func.count()).select_from(DeletionRecord)) == 0


def test_retention_expires_finished_inbox_events_and_old_audit_entries_only(app_ctx):
    operator = Operator(name="Retention Storage", status="active")
    db.session.add(operator)
    db.session.flush()
    old, fresh = timedelta(days=31), timedelta(days=29)
    kept = {"fresh-processed": ("processed", fresh), "old-failed": ("failed", old),
            "old-pending": ("pending", old), "old-processing": ("processing", old)}
    gone = {"old-processed": ("processed", old), "old-ignored": ("ignored", old),
            "older-processed": ("processed", timedelta(days=400))}
    for event_id, (status, age) in {**kept, **gone}.items():
        _inbox_event(operator.id, event_id, status=status, age=age)
    for action, age in (("old.entry", timedelta(days=366)), ("recent.entry", timedelta(days=1))):
        entry = audit.record(action, actor_type="system", actor="test", operator_id=operator.id)
        entry.created_at = utcnow() - age
    db.session.commit()

    now = utcnow()
    assert pending_deletions(now, RETENTION) == {"webhook_events": 3, "audit_log": 1}
    report = _retention(app_ctx, now)
    assert report.deleted == {"webhook_events": 3, "audit_log": 1}
    assert set(db.session.scalars(select(WebhookEvent.event_id))) == set(kept)
    assert db.session.scalars(select(AuditEntry.action)).all() == ["recent.entry"]
    records = {r.scope: r for r in db.session.scalars(select(DeletionRecord))}
    assert records["inbox_retention"].counts == {"webhook_events": 3}
    assert records["audit_retention"].counts == {"audit_log": 1}
    assert records["inbox_retention"].detail["older_than_days"] == 30
    # Nothing left to do: a second run deletes nothing and records nothing.
    assert _retention(app_ctx, now).deleted == {}
    assert db.session.scalar(select(func.count()).select_from(DeletionRecord)) == 2


def test_retention_runs_in_batches_with_progress_and_one_at_a_time(app_ctx):
    operator = Operator(name="Busy Storage", status="active")
    db.session.add(operator)
    db.session.flush()
    for n in range(7):
        _inbox_event(operator.id, f"evt-{n}", status="processed", age=timedelta(days=40))
    db.session.commit()

    other = get_redis(app_ctx).lock(LOCK_KEY, timeout=30, blocking=False)
    assert other.acquire()
    with pytest.raises(RetentionBusy):
        _retention(app_ctx, utcnow())
    assert db.session.scalar(select(func.count()).select_from(WebhookEvent)) == 7
    other.release()

    steps: list[int] = []
    report = _retention(app_ctx, utcnow(), batch_size=3, progress=steps.append)
    assert steps == [3, 3, 1] and report.deleted == {"webhook_events": 7}
    assert get_redis(app_ctx).get(LOCK_KEY) is None  # released


def test_the_cron_job_runs_retention_on_a_real_worker(app_ctx):
    operator = Operator(name="Cron Storage", status="active")
    db.session.add(operator)
    db.session.flush()
    _inbox_event(operator.id, "evt-old", status="processed", age=timedelta(days=90))
    db.session.commit()
    scheduler = build_scheduler(get_redis(app_ctx), orders_every=timedelta(minutes=15),
                                sweep_every=timedelta(minutes=1),
                                refresh_every=timedelta(minutes=5), name="retention-test")
    jobs = {job.func_name: job for job in scheduler.get_jobs()}
    assert jobs["partner_app.lifecycle.jobs.enforce_retention"].interval == 3600
    job = get_queue(QUEUE_DEFAULT).enqueue(enforce_retention)
    work(app_ctx, QUEUE_DEFAULT)
    job.refresh()
    assert job.get_status() == "finished", job.latest_result()
    assert job.return_value()["deleted"] == {"webhook_events": 1}
    db.session.expire_all()
    assert db.session.scalar(select(func.count()).select_from(WebhookEvent)) == 0


def test_cli_purges_and_runs_retention(client, app_ctx, sandbox):
    install(client, LEEDS)
    leeds = our_operator(LEEDS)
    runner = app_ctx.test_cli_runner()

    unknown = runner.invoke(cli, ["operators", "purge", "op_nobody", "--yes"])
    assert unknown.exit_code == 1 and "no operator 'op_nobody'" in unknown.output

    purged = runner.invoke(cli, ["operators", "purge", leeds.public_id, "--yes"])
    assert purged.exit_code == 0, purged.output
    assert f"{leeds.public_id} disconnected (revoked at Stora: yes, keys destroyed: 1)" \
        in purged.output
    again = runner.invoke(cli, ["operators", "purge", leeds.public_id, "--yes"])
    assert "purge already scheduled" in again.output

    ran = runner.invoke(cli, ["retention", "run"])
    assert ran.exit_code == 0, ran.output
    assert "purges completed: 0, cancelled: 0" in ran.output  # the grace has not passed
    bad = runner.invoke(cli, ["retention", "run", "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output


def test_retention_settings_are_validated_with_the_rest(backend_urls):
    from tests.conftest import settings_env

    env = settings_env(backend_urls, RETENTION_INBOX_DAYS="7", RETENTION_PURGE_DAYS="0")
    settings = Settings.from_env(env)
    assert settings.retention == RetentionSettings(inbox_days=7, audit_days=365,
                                                   purge_days=0)
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({**env, "RETENTION_AUDIT_DAYS": "forever",
                           "RETENTION_INBOX_DAYS": "0"})
    assert "RETENTION_AUDIT_DAYS must be an integer" in str(bad.value)
    assert "RETENTION_INBOX_DAYS must be between 1 and 3650" in str(bad.value)
