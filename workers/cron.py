"""``partner-app cron``: recurring jobs on RQ 3's ``CronScheduler``, one leader at a time.

Run it next to the workers, on as many machines as you like: every instance keeps the
schedule, but only the one holding the Redis lease ``partner-app:cron:leader`` enqueues.
The leader renews the lease every loop (at most ``TICK_SECONDS`` apart); if it dies, a
standby takes over once the lease lapses (``LEASE_SECONDS``). The jobs themselves
tolerate the rare double start of a failover: ``scheduled_sync`` starts a run only if
none is running, and the sweeper and token refresh are idempotent.

RQ's ``CronJob.enqueue`` uses RQ's default (pickle) serializer; the platform's workers
read JSON, so the jobs are enqueued through a JSON queue here.

Schedule (each settable by option or environment variable):

* ``partner_app.sync.jobs.scheduled_sync("orders")`` every ``--orders-every``
  (``SYNC_ORDERS_EVERY``, default 15m), on the ``sync`` queue;
* ``partner_app.sync.jobs.sweep`` every ``--sweep-every`` (default 1m);
* ``partner_app.connections.jobs.refresh_expiring_tokens`` every ``--refresh-every``
  (default 5m), if that function exists;
* ``partner_app.webhooks.reconcile_jobs.reconcile_all_webhooks`` every
  ``--webhooks-every`` (``WEBHOOKS_RECONCILE_EVERY``, default 10m): endpoint drift,
  retiring subscriptions, gap backfills;
* ``partner_app.webhooks.jobs.sweep_inbox`` every minute: inbox events whose processing
  was never queued or whose job died.
* ``partner_app.lifecycle.jobs.enforce_retention`` every ``--retention-every``
  (``RETENTION_EVERY``, default 1h): due operator purges, inbox and audit log retention.
"""

from __future__ import annotations

import importlib
import logging
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta

import click
from flask import current_app
from flask.cli import with_appcontext
from redis import Redis
from rq import cron_job_registry
from rq.cron import CronJob, CronScheduler
from rq.exceptions import StopRequested
from rq.queue import Queue
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

LEADER_KEY = "partner-app:cron:leader"
LEASE_SECONDS = 30
TICK_SECONDS = 5.0

# Renew only if we still hold it; release only if we hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class JSONCronJob(CronJob):
    """A ``CronJob`` that enqueues with the platform's JSON serializer."""

    def enqueue(self, connection: Redis):
        queue = Queue(self.queue_name, connection=connection, serializer=JSONSerializer)
        job = queue.enqueue(self.func_name, args=self.args, kwargs=self.kwargs,
                            **self.job_options)
        enqueued = job.enqueued_at.timestamp()
        with connection.pipeline() as pipe:
            # The history and registry RQ's own CronJob keeps, for its monitoring tools.
            pipe.zadd(self.job_history_key, {job.id: enqueued})
            pipe.zremrangebyrank(self.job_history_key, 0, -101)
            pipe.expire(self.job_history_key, 7 * 86400)
            cron_job_registry.add(self.name, pipe, enqueue_timestamp=enqueued)
            pipe.execute()
        log.info("cron.enqueued", extra={"job_func": self.func_name, "job_id": job.id})
        return job


class LeaderCronScheduler(CronScheduler):
    """A ``CronScheduler`` that enqueues only while it holds the leader lease."""

    def __init__(self, connection: Redis, *, lease_seconds: int = LEASE_SECONDS,
                 tick_seconds: float = TICK_SECONDS, name: str = ""):
        name = name or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        super().__init__(connection=connection, name=name)
        self.lease_ms = int(lease_seconds * 1000)
        self.tick_seconds = tick_seconds
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)
        self.is_leader = False

    def add(self, func_name: str, queue_name: str, *, interval: int,
            args: tuple = (), job_timeout: int | None = None) -> CronJob:
        """Schedule ``func_name`` (a dotted path) every ``interval`` seconds."""
        cron_job = JSONCronJob(queue_name=queue_name, func_name=func_name, args=args,
                               interval=interval, job_timeout=job_timeout,
                               failure_ttl=7 * 86400)
        # CronJob keeps ``func`` only for the log line; enqueueing uses ``func_name``.
        cron_job.func = _resolve(func_name)
        self._cron_jobs.append(cron_job)
        return cron_job

    def hold_lease(self) -> bool:
        """Take or renew the lease; True while this instance is the leader."""
        if self.is_leader and self._renew(keys=[LEADER_KEY], args=[self.name, self.lease_ms]):
            return True
        acquired = bool(self.connection.set(LEADER_KEY, self.name, nx=True, px=self.lease_ms))
        if acquired != self.is_leader:
            log.info("cron.leadership", extra={"scheduler": self.name, "leader": acquired})
        self.is_leader = acquired
        return acquired

    def enqueue_jobs(self) -> list[CronJob]:
        if not self.hold_lease():
            return []
        return super().enqueue_jobs()

    def calculate_sleep_interval(self) -> float:
        # Wake often enough to renew the lease (leader) or notice it lapse (standby).
        return min(super().calculate_sleep_interval(), self.tick_seconds)

    def release_lease(self) -> None:
        """Step down at once (a clean stop), so a standby need not wait for the lapse."""
        if self.is_leader:
            self._release(keys=[LEADER_KEY], args=[self.name])
            self.is_leader = False

    def register_death(self, pipeline=None) -> None:
        self.release_lease()
        super().register_death(pipeline)


def _resolve(func_name: str) -> Callable:
    module, _, attr = func_name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _importable(func_name: str) -> bool:
    try:
        _resolve(func_name)
    except (ImportError, AttributeError):
        return False
    return True


REFRESH_TOKENS = "partner_app.connections.jobs.refresh_expiring_tokens"
RECONCILE_WEBHOOKS = "partner_app.webhooks.reconcile_jobs.reconcile_all_webhooks"
SWEEP_INBOX = "partner_app.webhooks.jobs.sweep_inbox"
SWEEP_INBOX_EVERY = timedelta(minutes=1)
ENFORCE_RETENTION = "partner_app.lifecycle.jobs.enforce_retention"


def build_scheduler(connection: Redis, *, orders_every: timedelta, sweep_every: timedelta,
                    refresh_every: timedelta, webhooks_every: timedelta = timedelta(minutes=10),
                    name: str = "",
                    retention_every: timedelta = timedelta(hours=1)) -> LeaderCronScheduler:
    """The platform's schedule on a leader-elected scheduler (not started)."""
    from partner_app.queueing import QUEUE_DEFAULT, QUEUE_SYNC, QUEUE_WEBHOOKS

    scheduler = LeaderCronScheduler(connection, name=name)
    scheduler.add("partner_app.sync.jobs.scheduled_sync", QUEUE_SYNC, args=("orders",),
                  interval=int(orders_every.total_seconds()), job_timeout=300)
    scheduler.add("partner_app.sync.jobs.sweep", QUEUE_DEFAULT,
                  interval=int(sweep_every.total_seconds()), job_timeout=300)
    if _importable(REFRESH_TOKENS):
        scheduler.add(REFRESH_TOKENS, QUEUE_DEFAULT,
                      interval=int(refresh_every.total_seconds()), job_timeout=600)
    else:
        log.info("cron.refresh_not_scheduled", extra={"job_func": REFRESH_TOKENS})
    scheduler.add(RECONCILE_WEBHOOKS, QUEUE_WEBHOOKS,
                  interval=int(webhooks_every.total_seconds()), job_timeout=300)
    scheduler.add(SWEEP_INBOX, QUEUE_WEBHOOKS,
                  interval=int(SWEEP_INBOX_EVERY.total_seconds()), job_timeout=300)
    scheduler.add(ENFORCE_RETENTION, QUEUE_DEFAULT,
                  interval=int(retention_every.total_seconds()), job_timeout=3600)
    return scheduler


def _duration(ctx, param, value: str) -> timedelta:
    from partner_app.cli import parse_duration

    duration = parse_duration(value)
    if duration.total_seconds() < 1:
        raise click.BadParameter("must be at least 1s")
    return duration


@click.command("cron")
@click.option("--orders-every", default="15m", show_default=True, envvar="SYNC_ORDERS_EVERY",
              callback=_duration, help="Orders sync interval (90s, 15m, 1h …).")
@click.option("--sweep-every", default="1m", show_default=True, callback=_duration,
              help="Sync sweeper interval.")
@click.option("--refresh-every", default="5m", show_default=True, callback=_duration,
              help="Proactive token refresh interval.")
@click.option("--webhooks-every", default="10m", show_default=True,
              envvar="WEBHOOKS_RECONCILE_EVERY", callback=_duration,
              help="Webhook subscription reconcile interval.")
@click.option("--retention-every", default="1h", show_default=True, envvar="RETENTION_EVERY",
              callback=_duration, help="Retention (purges, inbox, audit log) interval.")
@with_appcontext
def cron(orders_every: timedelta, sweep_every: timedelta, refresh_every: timedelta,
         webhooks_every: timedelta, retention_every: timedelta) -> None:
    """Run the recurring-job scheduler (any number of instances; one leads)."""
    from partner_app.queueing import get_redis

    scheduler = build_scheduler(get_redis(current_app), orders_every=orders_every,
                                sweep_every=sweep_every, refresh_every=refresh_every,
                                webhooks_every=webhooks_every,
                                retention_every=retention_every)
    click.echo(f"cron ready: {scheduler.name}, jobs="
               + ",".join(job.func_name.rsplit(".", 1)[-1] for job in scheduler.get_jobs()),
               err=True)
    try:
        scheduler.start()
    except StopRequested:
        # A second stop signal (Ctrl-C reaches the whole process group, then the
        # launcher asks again) while already shutting down: stopping is what we want.
        click.echo("cron stopped", err=True)


def main() -> None:
    """``python -m workers.cron [OPTIONS]``: the same command, for deployments without
    the ``flask.commands`` entry point."""
    import sys

    from flask.cli import FlaskGroup

    from partner_app.cli import _create_app

    group = FlaskGroup(create_app=_create_app, add_default_commands=False,
                       add_version_option=False, load_dotenv=False, set_debug_flag=False)
    group.add_command(cron)
    group.main(args=["cron", *sys.argv[1:]], prog_name="python -m workers.cron")


if __name__ == "__main__":
    main()
