"""Refresh exactly once per expiry, survive crashes, classify every token-endpoint failure.

reliability.md T-1 (single flight across processes), T-3 (kill -9 at each failpoint,
both revocation modes), T-4 (fencing), T-5 (fault matrix), T-6 (401 after a sibling's
rotation). Real sandbox process, real PostgreSQL or SQLite, real child processes.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import func, select, update

from partner_app.audit import AuditEntry
from partner_app.connections.credentials import decrypt_column, read_credential
from partner_app.connections.models import Credential, Operator
from partner_app.connections.tokens import (
    PlatformCredentialsRejected,
    get_access_token,
)
from partner_app.db import db
from partner_app.incidents import PlatformIncident
from partner_app.queueing import get_redis
from partner_app.stora.client import StoraClient
from partner_app.stora.errors import OAuthUnavailable
from partner_app.stora.oauth import StoraOAuth
from tests import token_procs
from tests.conftest import BACKEND
from tests.integration.test_install_flow import LEEDS, install

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def operator_id(client, app_ctx) -> int:
    install(client, LEEDS)
    return db.session.scalars(select(Operator.id)).one()


def expire_locally(operator_id: int) -> None:
    """Make our copy look expired; Stora's token is still valid, so only we refresh."""
    db.session.execute(update(Credential).where(Credential.operator_id == operator_id)
                       .values(access_expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    db.session.commit()


def refreshes(sandbox, since: int) -> list[dict]:
    return [r for r in sandbox.requests_log(since)
            if r["path"] == "/oauth2/token" and r.get("grant_type") == "refresh_token"]


def last_seq(sandbox) -> int:
    log = sandbox.requests_log()
    return log[-1]["seq"] if log else 0


def token_for(app, operator_id: int, **kwargs) -> str:
    return get_access_token(operator_id, vault=app.extensions["vault"],
                            oauth=app.extensions["stora_oauth"], **kwargs)


def api_works(sandbox, token: str) -> bool:
    resp = requests.get(f"{sandbox.base_url}/2025-09/sites", timeout=10,
                        headers={"Authorization": f"Bearer {token}"})
    return resp.status_code == 200


def state(operator_id: int) -> tuple[str, int]:
    db.session.expire_all()
    operator = db.session.get(Operator, operator_id)
    return operator.status, read_credential(operator_id).version


# -- T-1 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_redis", [False, True], ids=["row-lock-only", "redis+row-lock"])
def test_t1_twenty_processes_one_refresh(app_ctx, app_env, operator_id, sandbox, use_redis):
    if BACKEND == "embedded" and not use_redis:
        pytest.skip("SQLite has no row locks: single flight there comes from the Redis lock")
    sandbox.admin("PATCH", "config", json={"revocation_mode": "immediate"})
    expire_locally(operator_id)
    since = last_seq(sandbox)
    barrier, results = SPAWN.Barrier(20), SPAWN.Queue()
    procs = [SPAWN.Process(target=token_procs.refresh_once,
                           args=(app_env, operator_id, use_redis, barrier, results))
             for _ in range(20)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    errors = [detail for kind, detail in outcomes if kind == "error"]
    assert errors == []
    assert len({digest for _, digest in outcomes}) == 1  # everyone got the committed token
    assert len(refreshes(sandbox, since)) == 1
    assert state(operator_id) == ("active", 2)
    assert api_works(sandbox, token_for(app_ctx, operator_id))


def test_t1_threads_of_one_process_share_one_flight(app_ctx, operator_id, sandbox):
    import threading

    expire_locally(operator_id)
    since = last_seq(sandbox)
    barrier, got, failures = threading.Barrier(12), [], []

    def call() -> None:
        with app_ctx.app_context():
            barrier.wait(10)
            try:
                got.append(token_for(app_ctx, operator_id))
            except Exception as exc:
                failures.append(exc)
            finally:
                db.session.remove()

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == [] and len(got) == 12 and len(set(got)) == 1
    assert len(refreshes(sandbox, since)) == 1


# -- T-3 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["on_use", "immediate"])
@pytest.mark.parametrize("point", ["before_token_post", "after_token_response_before_commit",
                                   "after_commit_before_first_use"])
def test_t3_kill_at_each_failpoint_then_recover(app_ctx, app_env, operator_id, sandbox,
                                                mode, point, capfd):
    sandbox.admin("PATCH", "config", json={"revocation_mode": mode})
    expire_locally(operator_id)
    child = SPAWN.Process(target=token_procs.refresh_until_killed,
                          args=({**app_env, "PARTNER_FAILPOINTS": f"{point}=kill"},
                                operator_id))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL

    lost_rotation = point == "after_token_response_before_commit" and mode == "immediate"
    if lost_rotation:
        # Stora rotated and revoked the old pair; we never stored the new one. The only
        # honest outcome is needs_reauth, never "active" with a dead token.
        with pytest.raises(Exception, match="refresh token rejected"):
            token_for(app_ctx, operator_id)
        assert state(operator_id)[0] == "needs_reauth"
    else:
        token = token_for(app_ctx, operator_id)
        assert state(operator_id)[0] == "active"
        assert api_works(sandbox, token)
    issued = sandbox.issued_secrets()
    captured = capfd.readouterr()
    assert not [v for v in issued if v in captured.out or v in captured.err]


# -- T-4 ------------------------------------------------------------------------------------
def test_t4_a_stale_refresher_is_fenced_out_and_adopts_the_winner(app_ctx, app_env,
                                                                  operator_id, sandbox):
    """A slow refresher must not overwrite a newer pair stored while it was away.

    On PostgreSQL the row lock makes the newer writer wait, so the slow one wins and
    the waiter is the one fenced; on SQLite (no row locks) the slow one is fenced out,
    revokes its orphan pair and adopts the winner's. Either way exactly one pair is
    stored and it works.
    """
    expire_locally(operator_id)
    slow = SPAWN.Process(target=token_procs.refresh_until_killed, args=(
        {**app_env, "PARTNER_FAILPOINTS": "after_token_response_before_commit=sleep:3"},
        operator_id))
    slow.start()
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    since = last_seq(sandbox)
    while not refreshes(sandbox, 0) and datetime.now(UTC) < deadline:
        time.sleep(0.05)  # until the slow refresher has spent the refresh token
    fast_token = None
    try:
        fast_token = token_for(app_ctx, operator_id)
    except Exception as exc:  # on PostgreSQL the fast one may wait and then adopt
        pytest.fail(f"the second refresher failed: {exc!r}")
    slow.join(60)
    assert slow.exitcode == 0
    db.session.expire_all()
    stored = decrypt_column(read_credential(operator_id), "access_token_ct",
                            vault=app_ctx.extensions["vault"])
    assert api_works(sandbox, stored)
    assert state(operator_id)[0] == "active"
    if BACKEND == "embedded":
        assert stored == fast_token
        revokes = [r for r in sandbox.requests_log(since) if r["path"] == "/oauth2/revoke"]
        assert len(revokes) == 1  # the fenced-out writer revoked its orphan pair


# -- T-5 ------------------------------------------------------------------------------------
def _fault(sandbox, **fault) -> None:
    sandbox.admin("POST", "faults", json={"endpoint": "token", "grant_type": "refresh_token",
                                          **fault})


@pytest.mark.parametrize("fault", [
    {"status": 500},
    {"status": 502},
    {"status": 503, "headers": {"Retry-After": "1"}},
    {"status": 429},
    {"mode": "malformed_json"},
    {"mode": "drop_after_commit"},
], ids=["500", "502", "503+retry-after", "429", "malformed-json", "dropped-after-commit"])
def test_t5_one_transient_failure_is_retried_and_recovers(app_ctx, operator_id, sandbox,
                                                          fault):
    expire_locally(operator_id)
    since = last_seq(sandbox)
    _fault(sandbox, **fault)
    token = token_for(app_ctx, operator_id)
    assert api_works(sandbox, token)
    assert len(refreshes(sandbox, since)) == 2
    assert state(operator_id) == ("active", 2)


def test_t5_read_timeout_after_the_server_committed_recovers(app_ctx, operator_id, sandbox):
    settings = app_ctx.extensions["settings"]
    impatient = StoraOAuth(client_id=settings.stora_client_id,
                           client_secret=settings.stora_client_secret,
                           authorize_url=settings.stora_authorize_url,
                           api_base=settings.stora_api_base,
                           redirect_uri=settings.redirect_uri, scopes=settings.stora_scopes,
                           timeout=(1.0, 1.0))
    expire_locally(operator_id)
    _fault(sandbox, latency_after_commit_ms=2500)
    token = get_access_token(operator_id, vault=app_ctx.extensions["vault"], oauth=impatient)
    assert api_works(sandbox, token)  # revoke-on-use: the old refresh token still worked
    assert state(operator_id) == ("active", 2)


def test_t5_persistent_outage_degrades_and_keeps_the_old_pair(app_ctx, operator_id, sandbox):
    expire_locally(operator_id)
    _fault(sandbox, status=503, count=-1)
    with pytest.raises(OAuthUnavailable):
        token_for(app_ctx, operator_id)
    db.session.expire_all()
    operator = db.session.get(Operator, operator_id)
    assert (operator.status, operator.refresh_failures) == ("degraded", 1)
    assert read_credential(operator_id).version == 1
    sandbox.admin("DELETE", "faults")
    assert api_works(sandbox, token_for(app_ctx, operator_id))
    assert state(operator_id) == ("active", 2)
    assert db.session.get(Operator, operator_id).refresh_failures == 0


def test_t5_long_retry_after_is_not_slept_in_the_worker(app_ctx, operator_id, sandbox):
    expire_locally(operator_id)
    since = last_seq(sandbox)
    _fault(sandbox, status=429, headers={"Retry-After": "30"})
    with pytest.raises(OAuthUnavailable) as raised:
        token_for(app_ctx, operator_id)
    assert raised.value.retry_after == 30
    assert len(refreshes(sandbox, since)) == 1


def test_t5_invalid_grant_means_needs_reauth_after_a_reread(app_ctx, operator_id, sandbox):
    sandbox_id = next(op["id"] for op in sandbox.operators() if op["name"] == LEEDS)
    sandbox.admin("POST", f"operators/{sandbox_id}/revoke_tokens")
    expire_locally(operator_id)
    with pytest.raises(Exception, match="refresh token rejected"):
        token_for(app_ctx, operator_id)
    assert state(operator_id) == ("needs_reauth", 1)
    assert "operator.needs_reauth" in db.session.scalars(select(AuditEntry.action)).all()
    with pytest.raises(Exception, match="needs to reconnect"):  # never retried on its own
        token_for(app_ctx, operator_id)


def test_t5_invalid_client_is_one_platform_incident_not_dead_tenants(client, app_ctx,
                                                                      sandbox):
    for name in [op["name"] for op in sandbox.operators()][:3]:
        install(client, name)
    ids = db.session.scalars(select(Operator.id)).all()
    _fault(sandbox, status=401, body={"error": "invalid_client"}, count=-1)
    for op_id in ids:
        expire_locally(op_id)
        with pytest.raises(PlatformCredentialsRejected):
            token_for(app_ctx, op_id)
    db.session.expire_all()
    assert set(db.session.scalars(select(Operator.status)).all()) == {"active"}
    incident = db.session.scalars(select(PlatformIncident)).one()
    assert (incident.kind, incident.occurrences, incident.resolved_at) == \
        ("stora_invalid_client", 3, None)
    sandbox.admin("DELETE", "faults")
    token_for(app_ctx, ids[0])  # a refresh that works closes the incident
    db.session.expire_all()
    assert db.session.scalars(select(PlatformIncident)).one().resolved_at is not None


def test_t5_missing_refresh_token_and_expires_in_lose_nothing(app_ctx, operator_id, sandbox):
    sandbox.admin("PATCH", "config", json={"omit_refresh_token_on_refresh": True,
                                           "omit_expires_in": True})
    expire_locally(operator_id)
    vault = app_ctx.extensions["vault"]
    old_refresh = decrypt_column(read_credential(operator_id), "refresh_token_ct", vault=vault)
    before = datetime.now(UTC)
    token_for(app_ctx, operator_id)
    credential = read_credential(operator_id)
    assert decrypt_column(credential, "refresh_token_ct", vault=vault) == old_refresh
    assert credential.access_expires_at >= before + timedelta(seconds=7200 - 5)
    expire_locally(operator_id)
    assert api_works(sandbox, token_for(app_ctx, operator_id))  # the kept token refreshes


# -- T-6 ------------------------------------------------------------------------------------
def test_t6_401_after_a_siblings_rotation_reuses_its_token(app_ctx, operator_id, sandbox):
    from partner_app.connections.tokens import OperatorTokens

    settings = app_ctx.extensions["settings"]
    old_token = token_for(app_ctx, operator_id)  # worker A holds this
    expire_locally(operator_id)
    new_token = token_for(app_ctx, operator_id)  # worker B refreshes...
    assert api_works(sandbox, new_token)  # ...and uses it: Stora revokes A's token
    assert not api_works(sandbox, old_token)
    since = last_seq(sandbox)

    class HeldToken(OperatorTokens):
        def access_token(self) -> str:
            return old_token  # what A read before B rotated

    tokens = HeldToken(operator_id, vault=app_ctx.extensions["vault"],
                       oauth=app_ctx.extensions["stora_oauth"], redis=get_redis(app_ctx))
    client = StoraClient(api_base=settings.stora_api_base, tokens=tokens)
    assert client.list_sites()
    assert refreshes(sandbox, since) == []  # re-read, no extra refresh
    sites = [r["status"] for r in sandbox.requests_log(since) if r["path"] == "/2025-09/sites"]
    assert sites == [401, 200]
    assert db.session.scalar(select(func.count()).select_from(PlatformIncident)) == 0
