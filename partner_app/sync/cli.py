"""``partner-app sync …``: start runs, follow them, inspect them.

``sync`` is an ``AppGroup``: its commands run inside an application context. Register
it with ``cli.add_command(sync)``.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime

import click
from flask.cli import AppGroup
from sqlalchemy import select

from partner_app.connections.lookup import operator_by_ref
from partner_app.db import db
from partner_app.sync.models import ItemStatus, RunStatus, SyncRun
from partner_app.sync.services import SYNC_NAMES, SyncError, items_of, start_sync

sync = AppGroup("sync", help="Sync Stora data for every operator (fan-out runs).")

POLL_SECONDS = 0.5


def _operator_id(ref: str) -> int:
    operator = operator_by_ref(ref)
    if operator is None:
        raise click.ClickException(f"no operator {ref!r}")
    operator_id = operator.id
    return operator_id


@sync.command("run")
@click.argument("name", type=click.Choice(SYNC_NAMES))
@click.option("--operator", "operator_ref", default=None,
              help="Sync only this operator (public id op_… or numeric id).")
@click.option("--wait/--no-wait", default=None,
              help="Follow the run to the end with a progress bar "
                   "(default: when stdout is a terminal).")
@click.option("--timeline/--no-timeline", default=True, show_default=True,
              help="Announce new records on each operator's Stora timeline.")
def run_command(name: str, operator_ref: str | None, wait: bool | None,
                timeline: bool) -> None:
    """Start a sync run; prints its id. Exits 1 if a followed run had failures."""
    operator_id = _operator_id(operator_ref) if operator_ref else None
    try:
        run = start_sync(name, requested_by="cli", operator_id=operator_id,
                         record_timeline=timeline)
    except SyncError as exc:
        raise click.ClickException(str(exc)) from None
    db.session.commit()
    click.echo(run.id)
    click.echo(f"started {name} sync run {run.id} for {run.total} operator(s)", err=True)
    if wait if wait is not None else sys.stdout.isatty():
        status = follow(run.id)
        print_summary(run.id)
        if status != RunStatus.COMPLETED:
            sys.exit(1)


def follow(run_id: int) -> str:
    """Show a progress bar fed from the run's counters until the run is over."""
    from tqdm import tqdm

    run = db.session.get(SyncRun, run_id)
    total, label = run.total, f"{run.name} #{run.id}"
    db.session.rollback()
    shown = 0
    try:
        with tqdm(total=total, unit="op", desc=label, disable=None, file=sys.stderr) as bar:
            while True:
                row = db.session.execute(
                    select(SyncRun.status, SyncRun.succeeded, SyncRun.failed, SyncRun.skipped)
                    .where(SyncRun.id == run_id)).one()
                # End the read so the next poll sees newer commits (SQLite snapshots).
                db.session.rollback()
                done = row.succeeded + row.failed + row.skipped
                bar.update(done - shown)
                shown = done
                bar.set_postfix(failed=row.failed, skipped=row.skipped, refresh=False)
                if row.status != RunStatus.RUNNING:
                    return row.status
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        click.echo(f"\nrun {run_id} keeps going in the workers; "
                   f"see `partner-app sync status {run_id}`", err=True)
        sys.exit(130)


def _duration(run: SyncRun) -> str:
    end = run.finished_at or datetime.now(UTC)
    return f"{(end - run.started_at).total_seconds():.1f}s"


def print_summary(run_id: int, *, detail_limit: int = 20) -> None:
    run = db.session.get(SyncRun, run_id)
    click.echo(f"run {run.id} {run.name}: {run.status} in {_duration(run)} "
               f"(requested by {run.requested_by})")
    click.echo(f"  succeeded {run.succeeded}, failed {run.failed}, skipped {run.skipped}, "
               f"of {run.total}")
    for title, status in (("failures", ItemStatus.FAILED), ("skipped", ItemStatus.SKIPPED)):
        items = items_of(run.id, statuses=[status], limit=detail_limit)
        if items:
            click.echo(f"  {title}:")
        for item in items:
            click.echo(f"    {item.operator_public_id}  {(item.operator_name or '-')[:32]:<32}  "
                       f"attempts={item.attempts}  {item.error or '-'}")
    if run.status == RunStatus.RUNNING:
        waiting = items_of(run.id, statuses=[ItemStatus.QUEUED, ItemStatus.RUNNING],
                           limit=detail_limit)
        if waiting:
            click.echo("  in progress:")
        for item in waiting:
            click.echo(f"    {item.operator_public_id}  {item.status:<8} pages={item.pages} "
                       f"records={item.records}  {item.error or ''}".rstrip())


@sync.command("status")
@click.argument("run_id", type=int, required=False)
@click.option("--limit", default=10, show_default=True, help="Runs to list.")
def status_command(run_id: int | None, limit: int) -> None:
    """Show one run in detail, or list the latest runs."""
    if run_id is not None:
        if db.session.get(SyncRun, run_id) is None:
            raise click.ClickException(f"no sync run {run_id}")
        print_summary(run_id)
        return
    runs = db.session.scalars(select(SyncRun).order_by(SyncRun.id.desc()).limit(limit)).all()
    if not runs:
        click.echo("no sync runs yet")
    for run in runs:
        click.echo(f"{run.id:>6}  {run.name:<8} {run.status:<24} {run.done:>6}/{run.total:<6} "
                   f"failed={run.failed:<5} {run.started_at:%Y-%m-%d %H:%M:%S}  {_duration(run)}")


@sync.command("sweep")
def sweep_command() -> None:
    """Repair runs whose jobs were lost (what cron runs every minute)."""
    from partner_app.sync.jobs import sweep

    click.echo(sweep())
