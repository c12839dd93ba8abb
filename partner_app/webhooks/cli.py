"""``partner-app webhooks …``: reconcile and rotate subscriptions, list them, replay events.

``webhooks`` is an ``AppGroup`` (its commands run in an application context); register
it with ``cli.add_command(webhooks)``. Output never shows a secret, and shows only the
first characters of a route key.
"""

from __future__ import annotations

from typing import Any

import click
from flask.cli import AppGroup

from partner_app.connections.lookup import operator_by_ref
from partner_app.db import db
from partner_app.stora.errors import RateLimited, RateLimitWait, StoraError

webhooks = AppGroup("webhooks", help="Webhook subscriptions at Stora and the webhook inbox.")


def _operator_id(ref: str) -> int:
    operator = operator_by_ref(ref)
    if operator is None:
        raise click.ClickException(f"no operator {ref!r}")
    operator_id = operator.id
    db.session.commit()
    return operator_id


def _echo_report(result: dict[str, Any]) -> None:
    for action in result.get("actions") or ["nothing to do"]:
        click.echo(f"  {action}")
    if result.get("backfill_run_id"):
        click.echo(f"  orders backfill: sync run {result['backfill_run_id']}")


def _run_inline(work) -> dict[str, Any]:
    """Run a reconcile step here and now, turning Stora trouble into a clear message."""
    from partner_app.connections.credentials import CredentialError

    try:
        return work()
    except (RateLimitWait, RateLimited) as exc:
        db.session.rollback()
        raise click.ClickException(
            f"Stora rate limit: try again in {int(exc.retry_after or 1) + 1}s") from None
    except (StoraError, CredentialError) as exc:
        db.session.rollback()
        from partner_app.webhooks.subscriptions import describe_error

        raise click.ClickException(f"not finished: {describe_error(exc)} "
                                   "(what was done is kept; run it again)") from None


@webhooks.command("reconcile")
@click.option("--operator", "operator_ref", default=None,
              help="Reconcile this operator now (public id op_… or numeric id); "
                   "without it, queue a reconcile job for every connected operator.")
@click.option("--retry-failed", is_flag=True,
              help="Replace a subscription whose create Stora rejected (with --operator).")
def reconcile_command(operator_ref: str | None, retry_failed: bool) -> None:
    """Make Stora's webhook endpoints match what each operator should have."""
    from partner_app.webhooks import subscriptions
    from partner_app.webhooks.reconcile_jobs import reconcile_all_webhooks

    if operator_ref is None:
        if retry_failed:
            raise click.UsageError("--retry-failed needs --operator")
        outcome = reconcile_all_webhooks()
        click.echo(f"queued {outcome['queued']} reconcile job(s) for {outcome['operators']} "
                   f"connected operator(s); closed {outcome['closed']} subscription(s) of "
                   "disconnected operators")
        return
    operator_id = _operator_id(operator_ref)
    result = _run_inline(lambda: subscriptions.reconcile_operator(
        operator_id, retry_failed=retry_failed))
    click.echo(f"reconciled {operator_ref}:")
    _echo_report(result)


@webhooks.command("rotate")
@click.argument("operator_ref")
def rotate_command(operator_ref: str) -> None:
    """Give the operator a new endpoint and secret; the old one retires after an overlap."""
    from partner_app.webhooks import subscriptions

    operator_id = _operator_id(operator_ref)
    result = _run_inline(lambda: subscriptions.rotate_secret(operator_id))
    click.echo(f"rotated {operator_ref}:")
    _echo_report(result)


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@webhooks.command("list")
@click.option("--operator", "operator_ref", default=None, help="Only this operator.")
@click.option("--all", "show_all", is_flag=True, help="Include disabled subscriptions.")
def list_command(operator_ref: str | None, show_all: bool) -> None:
    """List subscriptions: status, URL (route key cut), endpoint, health."""
    from partner_app.webhooks.models import SubscriptionStatus
    from partner_app.webhooks.subscriptions import subscriptions_overview

    operator_id = _operator_id(operator_ref) if operator_ref else None
    statuses = None if show_all else [status for status in SubscriptionStatus
                                      if status != SubscriptionStatus.DISABLED]
    rows = subscriptions_overview(operator_id, statuses)
    if not rows:
        click.echo("no subscriptions")
    for row in rows:
        click.echo(f"{row.id:>6}  {row.operator_public_id}  {row.status:<9} {row.display_url}  "
                   f"{row.stora_endpoint_id or '-'}  {','.join(row.event_types)}")
        details = [f"reconciled {_when(row.last_reconciled_at)}",
                   f"last delivery {_when(row.last_delivery_at)}"]
        if row.retire_after:
            details.append(f"retires {_when(row.retire_after)}")
        if row.last_error:
            details.append(f"error: {row.last_error}")
        click.echo("        " + "; ".join(details))


@webhooks.command("replay")
@click.argument("event_row_id", type=int)
def replay_command(event_row_id: int) -> None:
    """Process an inbox event again (by its row id), whatever its status."""
    from partner_app.webhooks.jobs import replay_event
    from partner_app.webhooks.models import WebhookEvent

    event = db.session.get(WebhookEvent, event_row_id)
    if event is None:
        raise click.ClickException(f"no inbox event {event_row_id}")
    summary = f"{event.event_type} {event.event_id}, was {event.status}"
    db.session.commit()
    replay_event(event_row_id)
    click.echo(f"queued replay of event {event_row_id} ({summary})")
