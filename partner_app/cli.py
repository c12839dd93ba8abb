"""``partner-app …``: the command line for operators of the platform.

A FlaskGroup, so Flask-Migrate's ``db`` commands (``partner-app db upgrade``) come for
free. Commands that need no configuration (``keys generate``, ``sandbox``, ``demo``)
run without building the app.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, datetime, timedelta

import click
from flask import current_app
from flask.cli import FlaskGroup

from partner_app.settings import ConfigError


def _create_app():
    from partner_app import create_app

    try:
        return create_app()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(cls=FlaskGroup, create_app=_create_app, add_version_option=False,
             load_dotenv=False, set_debug_flag=False)
def cli() -> None:
    """Stora partner integration platform."""


def main() -> None:
    cli(prog_name="partner-app")


_DURATION_RE = re.compile(r"^(\d+)([smhd])$")


def parse_duration(value: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``7d`` → timedelta."""
    match = _DURATION_RE.match(value.strip())
    if not match:
        raise click.BadParameter("use a number and a unit: 90s, 15m, 1h, 7d")
    amount, unit = int(match.group(1)), match.group(2)
    unit_name = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]
    return timedelta(**{unit_name: amount})


# -- keys ------------------------------------------------------------------------------------
@cli.group()
def keys() -> None:
    """Encryption keys: generate new ones, rotate stored secrets onto the active one."""


@keys.command("generate", with_appcontext=False)
@click.option("--kid", default=None, help="Key id (default: k<date>).")
def keys_generate(kid: str | None) -> None:
    """Print a new ``kid:base64key`` entry to put first in ENCRYPTION_KEYS."""
    from partner_app.security.vault import generate_key_entry

    click.echo(generate_key_entry(kid or "k" + datetime.now(UTC).strftime("%Y%m%d%H%M")))


@keys.command("rotate")
@click.option("--batch-size", default=200, show_default=True)
@click.option("--new-data-keys", is_flag=True,
              help="Also give every operator a new data key and re-encrypt its secrets.")
def keys_rotate(batch_size: int, new_data_keys: bool) -> None:
    """Re-wrap every data key under the active key (resumable, safe while running)."""
    from tqdm import tqdm

    from partner_app.security.rotation import pending_rotation_count, rotate_keys

    vault = current_app.extensions["vault"]
    total = pending_rotation_count(vault=vault, new_data_keys=new_data_keys)
    with tqdm(total=total, unit="key", desc=f"rotating to {vault.keyring.active_kid}",
              disable=None) as bar:
        report = rotate_keys(vault=vault, batch_size=batch_size, new_data_keys=new_data_keys,
                             progress=bar.update)
    click.echo(report.summary())


# -- install links ---------------------------------------------------------------------------
@cli.group()
def links() -> None:
    """Install links for operators."""


@links.command("create")
@click.option("--operator", "operator_ref", default=None,
              help="Public id (op_…) of an operator to reconnect.")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 30m, 1h, 7d …",
              callback=lambda ctx, param, value: parse_duration(value))
@click.option("--note", default=None, help="Who the link is for (shown to staff).")
def links_create(operator_ref: str | None, ttl: timedelta, note: str | None) -> None:
    """Print a single-use install link."""
    from partner_app.connections.install import create_install_link
    from partner_app.db import db

    operator = _find_operator(operator_ref) if operator_ref else None
    issued = create_install_link(settings=current_app.extensions["settings"], created_by="cli",
                                 now=datetime.now(UTC), operator=operator,
                                 ttl=ttl, note=note)
    db.session.commit()
    click.echo(issued.url)
    click.echo(f"expires {issued.link.expires_at:%Y-%m-%d %H:%M UTC}"
               + (f", reconnects {operator.public_id}" if operator else ""), err=True)


# -- operators -------------------------------------------------------------------------------
@cli.group()
def operators() -> None:
    """Connected operators."""


@operators.command("list")
def operators_list() -> None:
    from partner_app.dashboard.queries import operators_overview

    for op in operators_overview():
        last = op.last_api_success_at.isoformat(timespec="seconds") \
            if op.last_api_success_at else "-"
        click.echo(f"{op.public_id}  {op.status:<13} {op.name or '-':<32} last_api={last}")


@operators.command("disconnect")
@click.argument("operator_ref")
@click.option("--no-revoke", is_flag=True,
              help="Disconnect locally even though Stora cannot be told (it keeps the grant).")
@click.confirmation_option(prompt="Disconnect this operator and destroy its keys?")
def operators_disconnect(operator_ref: str, no_revoke: bool) -> None:
    """Revoke at Stora, destroy the operator's keys, mark it disconnected."""
    from partner_app.connections.disconnect import DisconnectFailed, disconnect_operator
    from partner_app.db import db

    operator = _find_operator(operator_ref)
    try:
        result = disconnect_operator(
            operator, vault=current_app.extensions["vault"],
            oauth=current_app.extensions["stora_oauth"], now=datetime.now(UTC),
            actor_type="system", actor="cli", revoke=not no_revoke)
    except DisconnectFailed as exc:
        raise click.ClickException(f"not disconnected: {exc.reason} (nothing changed; retry, "
                                   "or use --no-revoke)") from None
    db.session.commit()
    if result.already_disconnected:
        click.echo(f"{operator.public_id} was already disconnected")
    else:
        click.echo(f"{operator.public_id} disconnected; revoked at Stora: "
                   f"{'yes' if result.revoked_at_stora else 'no'}; "
                   f"keys destroyed: {result.destroyed_keys}")


def _find_operator(ref: str):
    from partner_app.connections.lookup import operator_by_ref

    operator = operator_by_ref(ref)
    if operator is None:
        raise click.ClickException(f"no operator {ref!r}")
    return operator


# -- staff -----------------------------------------------------------------------------------
@cli.group()
def staff() -> None:
    """Staff accounts for the dashboard."""


@staff.command("create")
@click.argument("email")
@click.option("--role", type=click.Choice(["admin", "viewer"]), default="admin",
              show_default=True, help="Admins run actions; viewers only look.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from standard input (its first line) instead of "
                   "asking for it: for scripts.")
def staff_create(email: str, role: str, password_stdin: bool) -> None:
    """Add a dashboard account. Asks for the password twice, on the terminal.

    With ``--password-stdin`` the password is the first line of standard input. A
    script must use it: a hidden prompt reads the controlling terminal, not standard
    input, so a script run from a terminal would wait there for someone to type.
    """
    from partner_app.db import db
    from partner_app.security.staff import StaffError, create_staff

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password (min. 12 characters)", hide_input=True,
                                confirmation_prompt=True)
    try:
        create_staff(email, password, role=role, actor="cli")
    except StaffError as exc:
        raise click.ClickException(str(exc)) from None
    db.session.commit()
    click.echo(f"created {role} account {email}")


# -- sync ------------------------------------------------------------------------------------
from partner_app.sync.cli import sync  # noqa: E402

cli.add_command(sync)


# -- webhooks --------------------------------------------------------------------------------
from partner_app.webhooks.cli import webhooks  # noqa: E402

cli.add_command(webhooks)


# -- data lifecycle --------------------------------------------------------------------------
from partner_app.lifecycle.cli import operators_purge, retention  # noqa: E402

operators.add_command(operators_purge)
cli.add_command(retention)


# -- processes -------------------------------------------------------------------------------
@cli.command("sandbox", with_appcontext=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--port", default=5001, show_default=True)
@click.pass_context
def sandbox(ctx: click.Context, port: int) -> None:
    """Run stora_sandbox, the local Stora (extra options pass through)."""
    os.execv(sys.executable, [sys.executable, "-m", "stora_sandbox", "--port", str(port),
                              *ctx.args])


@cli.command("web", with_appcontext=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True)
@click.option("--workers", default=2, show_default=True, envvar="WEB_WORKERS",
              type=click.IntRange(1), help="Processes (gunicorn workers).")
@click.option("--threads", default=4, show_default=True, envvar="WEB_THREADS",
              type=click.IntRange(1), help="Threads per process.")
def web(host: str, port: int, workers: int, threads: int) -> None:
    """Serve the web app with gunicorn (access log without query strings)."""
    os.execvp(sys.executable, [
        sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", f"{host}:{port}",
        "--workers", str(workers), "--threads", str(threads), "--worker-class", "gthread",
        "--access-logfile", "-",
        # %(U)s is the path without the query string: the callback's code and state
        # must never reach a log.
        "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s',
        "--config", "python:partner_app.gunicorn_conf",
        "--logger-class", "partner_app.access_log.RedactingLogger",
        "--graceful-timeout", "10", "--no-control-socket"])


@cli.command("demo", with_appcontext=False)
@click.option("--web-port", default=5000, show_default=True)
@click.option("--sandbox-port", default=5001, show_default=True)
@click.option("--instance", default="instance", show_default=True,
              help="Folder for the SQLite file, the embedded Redis and demo secrets.")
def demo(web_port: int, sandbox_port: int, instance: str) -> None:
    """Run the local Stora, the web app and a worker on embedded defaults."""
    from pathlib import Path

    from partner_app.demo import run_demo

    run_demo(web_port=web_port, sandbox_port=sandbox_port, instance=Path(instance))


if __name__ == "__main__":
    main()
