"""The first API job, run by a real forking RQ worker against the sandbox."""

from __future__ import annotations

from sqlalchemy import select

from partner_app.connections.models import Credential, Operator
from partner_app.db import db
from partner_app.queueing import get_queue
from tests.integration.test_install_flow import LEEDS, install
from workers.app_worker import AppWorker


def run_jobs(app) -> None:
    worker = AppWorker([get_queue("default", app)], connection=get_queue("default", app).connection,
                       app=app)
    worker.work(burst=True, with_scheduler=False)


def _sandbox_operator_id(sandbox, name: str) -> str:
    return next(op["id"] for op in sandbox.operators() if op["name"] == name)


def test_worker_lists_sites_and_records_success(client, app_ctx, sandbox):
    install(client, LEEDS)
    run_jobs(app_ctx)
    db.session.expire_all()
    operator = db.session.scalars(select(Operator)).one()
    assert operator.last_api_success_at is not None
    assert operator.storefront_host == "leeds-city-storage.stora.test"
    assert operator.last_error is None


def test_expired_access_token_is_refreshed_once_then_the_call_succeeds(client, app_ctx,
                                                                       sandbox):
    install(client, LEEDS)
    sandbox.admin("POST", f"operators/{_sandbox_operator_id(sandbox, LEEDS)}/expire_access_tokens")
    since = sandbox.requests_log()[-1]["seq"]
    run_jobs(app_ctx)
    log = sandbox.requests_log(since)
    refreshes = [r for r in log if r["path"] == "/oauth2/token"]
    assert [r["grant_type"] for r in refreshes] == ["refresh_token"]
    assert [r["status"] for r in log if r["path"] == "/2025-09/sites"] == [401, 200]
    db.session.expire_all()
    assert db.session.scalars(select(Credential)).one().version == 2
    assert db.session.scalars(select(Operator)).one().last_api_success_at is not None


def test_revoked_grant_marks_the_operator_needs_reauth(client, app_ctx, sandbox):
    install(client, LEEDS)
    sandbox.admin("POST", f"operators/{_sandbox_operator_id(sandbox, LEEDS)}/revoke_tokens")
    run_jobs(app_ctx)
    db.session.expire_all()
    operator = db.session.scalars(select(Operator)).one()
    assert operator.status == "needs_reauth"
    assert operator.last_api_success_at is None
