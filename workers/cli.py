"""``partner-app worker``: registered on the CLI through the ``flask.commands`` entry point,
so ``partner_app`` itself never imports ``workers``."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext


@click.command("worker")
@click.argument("queues", nargs=-1)
@click.option("--burst", is_flag=True, help="Stop when the queues are empty.")
@click.option("--no-scheduler", is_flag=True, help="Do not run the RQ scheduler in this worker.")
@click.option("--name", default=None, help="Worker name (default: RQ's).")
@click.option("--maintenance-interval", default=30, show_default=True, type=click.IntRange(1),
              envvar="WORKER_MAINTENANCE_INTERVAL",
              help="Seconds between RQ maintenance runs (see below).")
@with_appcontext
def worker(queues: tuple[str, ...], burst: bool, no_scheduler: bool, name: str | None,
           maintenance_interval: int) -> None:
    """Run an RQ worker (with the scheduler that Retry intervals need).

    RQ's maintenance is how live workers take over from a dead one (kill -9, a lost
    machine): it re-queues the jobs it abandoned once their heartbeat lapses (60-90 s),
    frees their per-operator concurrency slots, fails jobs stranded between dequeue and
    start, and takes over the dead worker's scheduler lock once it lapses (61 s); until
    then no retry or rate-limit wait is due anywhere. RQ runs it every 10 minutes by
    default; every 30 s here, so a dead worker's work resumes within about two minutes.
    One worker per queue does the cleaning each time (RQ's maintenance lock).
    """
    from partner_app import metrics
    from partner_app.queueing import QUEUES, get_queue, get_redis
    from workers.app_worker import ReusedHorseWorker, prepare_for_fork

    app = current_app._get_current_object()
    names = queues or QUEUES
    connection = get_redis(app)
    prepare_for_fork(app)
    worker_ = ReusedHorseWorker([get_queue(n, app) for n in names], connection=connection,
                                app=app, name=name,
                                maintenance_interval=maintenance_interval)
    click.echo(f"worker ready: queues={','.join(names)} scheduler={not no_scheduler}", err=True)
    worker_.work(burst=burst, with_scheduler=not no_scheduler, logging_level="INFO")
    metrics.mark_process_dead()
