"""``partner-app operators purge ID`` and ``partner-app retention run``."""

from __future__ import annotations

import sys

import click
from flask import current_app
from flask.cli import AppGroup

from partner_app.db import db, utcnow


@click.command("purge")
@click.argument("operator_ref")
@click.option("--no-revoke", is_flag=True,
              help="Purge even though Stora cannot be told (it keeps the grant).")
@click.confirmation_option(
    prompt="Disconnect this operator, destroy its keys and schedule deleting its data?")
def operators_purge(operator_ref: str, no_revoke: bool) -> None:
    """Disconnect an operator and schedule the deletion of its mirrored data."""
    from partner_app.connections.disconnect import DisconnectFailed
    from partner_app.connections.lookup import operator_by_ref
    from partner_app.lifecycle.purge import purge_operator

    operator = operator_by_ref(operator_ref)
    if operator is None:
        raise click.ClickException(f"no operator {operator_ref!r}")
    settings = current_app.extensions["settings"]
    try:
        result = purge_operator(
            operator, vault=current_app.extensions["vault"],
            oauth=current_app.extensions["stora_oauth"], retention=settings.retention,
            now=utcnow(), actor_type="system", actor="cli", revoke=not no_revoke)
    except DisconnectFailed as exc:
        raise click.ClickException(f"not purged: {exc.reason} (nothing changed; retry, "
                                   "or use --no-revoke)") from None
    db.session.commit()
    record = result.record
    when = f"{record.delete_after:%Y-%m-%d %H:%M UTC}"
    if result.already_scheduled:
        click.echo(f"{record.operator_ref} purge already scheduled (deletion record "
                   f"{record.id}); its data is deleted after {when}")
    else:
        click.echo(f"{record.operator_ref} disconnected (revoked at Stora: "
                   f"{'yes' if result.revoked_at_stora else 'no'}, keys destroyed: "
                   f"{result.destroyed_keys}); data deleted after {when} "
                   f"(deletion record {record.id})")


retention = AppGroup("retention", help="Data retention: purged operators, inbox, audit log.")


@retention.command("run")
@click.option("--batch-size", default=1000, show_default=True,
              type=click.IntRange(1, 100_000))
def retention_run(batch_size: int) -> None:
    """Delete what retention says is due now, with a progress bar."""
    from tqdm import tqdm

    from partner_app.lifecycle.retention import (
        RetentionBusy,
        pending_deletions,
        run_retention,
    )
    from partner_app.queueing import get_redis

    settings = current_app.extensions["settings"].retention
    now = utcnow()
    total = sum(pending_deletions(now, settings).values())
    try:
        with tqdm(total=total, unit="row", desc="retention", disable=None,
                  file=sys.stderr) as bar:
            report = run_retention(redis=get_redis(current_app), settings=settings, now=now,
                                   actor_type="system", actor="cli",
                                   commit=db.session.commit, progress=bar.update,
                                   batch_size=batch_size)
    except RetentionBusy:
        raise click.ClickException("another retention run is in progress; "
                                   "try again when it ends") from None
    click.echo(report.summary())
