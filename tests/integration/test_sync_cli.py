"""``partner-app sync run/status``: the run id, following a run to its summary."""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from partner_app.cli import cli
from partner_app.db import db
from partner_app.sync.models import SyncRun
from tests.integration.test_sync import connect_seeded, work


def _wait_for_run() -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        run_id = db.session.scalar(select(SyncRun.id))
        db.session.rollback()
        if run_id is not None:
            return run_id
        time.sleep(0.05)
    raise AssertionError("the command started no run")


def test_run_with_wait_follows_the_run_to_its_summary(client, app_ctx, sandbox):
    names = connect_seeded(client, sandbox)
    runner = app_ctx.test_cli_runner()
    outcome = {}
    command = threading.Thread(target=lambda: outcome.update(result=runner.invoke(
        cli, ["sync", "run", "orders", "--wait", "--no-timeline"])))
    command.start()
    run_id = _wait_for_run()
    work(app_ctx)  # the workers do the run while the command watches the counters
    command.join(30)
    result = outcome["result"]
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert str(run_id) in lines
    assert f"run {run_id} orders: completed in" in result.output
    assert f"succeeded {len(names)}, failed 0, skipped 0, of {len(names)}" in result.output

    listing = runner.invoke(cli, ["sync", "status"])
    assert listing.exit_code == 0 and "completed" in listing.output
    detail = runner.invoke(cli, ["sync", "status", str(run_id)])
    assert f"run {run_id} orders: completed" in detail.output


def test_run_without_wait_prints_the_id_and_failures_show_in_status(client, app_ctx,
                                                                   sandbox):
    connect_seeded(client, sandbox)
    runner = app_ctx.test_cli_runner()
    result = runner.invoke(cli, ["sync", "run", "orders", "--no-wait", "--operator", "op_nope"])
    assert result.exit_code != 0 and "no operator 'op_nope'" in result.output
    result = runner.invoke(cli, ["sync", "run", "orders", "--no-wait", "--no-timeline"])
    assert result.exit_code == 0
    run_id = int(result.output.split()[0])
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 403, "count": 1})
    work(app_ctx)
    detail = runner.invoke(cli, ["sync", "status", str(run_id)])
    assert "completed_with_failures" in detail.output
    assert "failures:" in detail.output and "Forbidden 403 forbidden" in detail.output
