"""Cron (one leader across schedulers, JSON jobs that real workers run, no stacked
runs) and the sweeper that repairs runs whose jobs were lost."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from rq.job import Job
from rq.serializers import JSONSerializer
from sqlalchemy import select, update

from partner_app.db import db
from partner_app.queueing import get_redis
from partner_app.sync import jobs as sync_jobs
from partner_app.sync.models import SyncRun, SyncRunItem
from partner_app.sync.services import fan_out_job_id
from tests.integration.test_sync import (
    commit_run,
    connect_seeded,
    items_by_operator,
    our_operator,
    run_state,
    work,
)
from workers.cron import LEADER_KEY, build_scheduler


def _scheduler(app, name: str):
    scheduler = build_scheduler(get_redis(app), orders_every=timedelta(minutes=15),
                                sweep_every=timedelta(minutes=1),
                                refresh_every=timedelta(minutes=5), name=name)
    scheduler.register_birth()  # what start() does first
    return scheduler


def _names(cron_jobs) -> set[str]:
    return {job.func_name.rsplit(".", 1)[-1] for job in cron_jobs}


def test_only_the_leader_enqueues_and_a_standby_takes_over(app_ctx):
    first, second = _scheduler(app_ctx, "first"), _scheduler(app_ctx, "second")
    assert {"scheduled_sync", "sweep"} <= _names(first.enqueue_jobs())
    assert second.enqueue_jobs() == []
    assert first.enqueue_jobs() == []  # leader, but nothing is due yet
    assert get_redis(app_ctx).get(LEADER_KEY) == b"first"

    first.register_death()  # a clean stop hands the lease over at once
    assert {"scheduled_sync", "sweep"} <= _names(second.enqueue_jobs())
    assert second.is_leader and not first.hold_lease()

    # A leader that stops renewing loses the lease when it lapses.
    second.lease_ms = 300
    second.hold_lease()
    time.sleep(0.4)
    assert first.hold_lease() and get_redis(app_ctx).get(LEADER_KEY) == b"first"


def test_cron_jobs_run_on_the_json_workers_and_never_stack_runs(client, app_ctx, sandbox):
    connect_seeded(client, sandbox)
    scheduler = _scheduler(app_ctx, "solo")
    enqueued = scheduler.enqueue_jobs()
    sync_job = next(job for job in enqueued if job.func_name.endswith("scheduled_sync"))
    ids = get_redis(app_ctx).zrange(sync_job.job_history_key, 0, -1)
    job = Job.fetch(ids[0].decode(), connection=get_redis(app_ctx), serializer=JSONSerializer)
    assert job.args == ["orders"]

    # A second start while the first run is going is skipped.
    assert sync_jobs.scheduled_sync("orders")["run_id"] == 1
    assert sync_jobs.scheduled_sync("orders") == {"skipped": "run 1 still running"}
    work(app_ctx)
    runs = db.session.scalars(select(SyncRun)).all()
    assert [(run.requested_by, run.status) for run in runs] == [("cron", "completed")]
    assert job.get_status(refresh=True) == "finished"


def test_sweeper_repairs_lost_and_dead_jobs(client, app_ctx, sandbox):
    lost, dead, alive = (our_operator(name) for name in connect_seeded(client, sandbox))
    run_id = commit_run()
    sync_jobs.fan_out(run_id)
    connection = get_redis(app_ctx)

    def fetch(one: str) -> Job:
        return Job.fetch(one, connection=connection, serializer=JSONSerializer)

    fetch(fan_out_job_id(run_id)).delete()  # the parent is done and its result expired
    fetch(sync_jobs.job_id(run_id, lost.id)).delete()  # e.g. Redis lost it
    dead_job = fetch(sync_jobs.job_id(run_id, dead.id))
    dead_job.delete()
    connection.hset(Job.key_for(dead_job.id), "status", "failed")  # died on its last try
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    db.session.execute(update(SyncRunItem).values(updated_at=long_ago))
    db.session.execute(update(SyncRunItem).where(SyncRunItem.operator_id == dead.id)
                       .values(status="running", claim_attempt=3))
    db.session.execute(update(SyncRun).values(started_at=long_ago))
    db.session.commit()

    assert sync_jobs.sweep() == {"requeued": 1, "failed": 1, "refanned": 1}
    assert sync_jobs.sweep() == {"requeued": 0, "failed": 0, "refanned": 0}
    work(app_ctx)
    items = items_by_operator(run_id)
    assert items[lost.id].status == items[alive.id].status == "succeeded"
    assert items[dead.id].status == "failed"
    assert items[dead.id].error == "job ended (failed) without settling the item"
    run = run_state(run_id)
    assert (run.status, run.succeeded, run.failed) == ("completed_with_failures", 2, 1)
