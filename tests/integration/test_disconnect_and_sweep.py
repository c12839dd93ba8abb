"""Disconnect (revoke, crypto-shred, idempotent) and the proactive refresh sweep."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from partner_app.connections.credentials import NotConnected
from partner_app.connections.disconnect import DisconnectFailed, disconnect_operator
from partner_app.connections.jobs import refresh_expiring_tokens
from partner_app.connections.models import Credential, Operator
from partner_app.db import db
from partner_app.queueing import get_queue
from partner_app.security.models import DataKey
from partner_app.security.vault import KeyDestroyedError
from tests.integration.test_first_api_call import run_jobs
from tests.integration.test_install_flow import LEEDS, install
from tests.integration.test_token_lifecycle import api_works, last_seq, token_for


@pytest.fixture
def operator(client, app_ctx) -> Operator:
    install(client, LEEDS)
    get_queue("default").empty()
    return db.session.scalars(select(Operator)).one()


def _disconnect(app, operator, **kwargs):
    result = disconnect_operator(operator, vault=app.extensions["vault"],
                                 oauth=app.extensions["stora_oauth"], now=datetime.now(UTC),
                                 actor_type="staff", actor="test@partner.example", **kwargs)
    db.session.commit()
    return result


def test_disconnect_revokes_shreds_and_is_idempotent(app_ctx, operator, sandbox):
    token = token_for(app_ctx, operator.id)
    key = db.session.scalars(select(DataKey)).one()
    wrapped_before = key.wrapped_key
    since = last_seq(sandbox)
    result = _disconnect(app_ctx, operator)
    assert result.revoked_at_stora and result.destroyed_keys == 1
    assert not api_works(sandbox, token)  # Stora revoked the whole grant
    assert [r["status"] for r in sandbox.requests_log(since)
            if r["path"] == "/oauth2/revoke"] == [200]
    db.session.expire_all()
    assert db.session.get(Operator, operator.id).status == "disconnected"
    assert db.session.scalar(select(func.count()).select_from(Credential)) == 0
    key = db.session.scalars(select(DataKey)).one()
    assert key.wrapped_key is None and key.destroyed_at is not None
    with pytest.raises(KeyDestroyedError):  # even a copy of the old row is now useless
        app_ctx.extensions["vault"].cipher_for(operator_id=operator.id, data_key_id=key.id,
                                               wrapped_key=None)
    assert app_ctx.extensions["vault"].cipher_for(operator_id=operator.id, data_key_id=key.id,
                                                  wrapped_key=wrapped_before)
    again = _disconnect(app_ctx, db.session.get(Operator, operator.id))
    assert again.already_disconnected
    with pytest.raises(NotConnected):
        token_for(app_ctx, operator.id)


def test_disconnect_while_stora_is_down_changes_nothing(app_ctx, operator, sandbox):
    sandbox.admin("POST", "faults", json={"endpoint": "revoke", "status": 503, "count": -1})
    with pytest.raises(DisconnectFailed) as failed:
        _disconnect(app_ctx, operator)
    assert failed.value.reason == "stora_unavailable"
    db.session.rollback()
    assert db.session.get(Operator, operator.id).status == "active"
    assert token_for(app_ctx, operator.id)
    forced = _disconnect(app_ctx, db.session.get(Operator, operator.id), revoke=False)
    assert not forced.revoked_at_stora and forced.destroyed_keys == 1


def test_a_reconnect_after_disconnect_gets_a_fresh_key(client, app_ctx, operator):
    _disconnect(app_ctx, operator)
    install(client, LEEDS)
    db.session.expire_all()
    assert db.session.get(Operator, operator.id).status == "active"
    keys = db.session.scalars(select(DataKey).order_by(DataKey.id)).all()
    assert [k.destroyed_at is None for k in keys] == [False, True]
    assert token_for(app_ctx, operator.id)


def test_sweep_refreshes_tokens_nearing_expiry_once(app_ctx, operator, sandbox):
    now = datetime.now(UTC)  # a two-hour token with ten minutes left
    db.session.execute(update(Credential).values(
        refreshed_at=now - timedelta(minutes=110), access_expires_at=now + timedelta(minutes=10)))
    db.session.commit()
    assert refresh_expiring_tokens() == {"due": 1, "queued": 1}
    assert refresh_expiring_tokens() == {"due": 1, "queued": 0}  # unique job id
    since = last_seq(sandbox)
    run_jobs(app_ctx)
    refreshes = [r for r in sandbox.requests_log(since) if r["path"] == "/oauth2/token"]
    assert len(refreshes) == 1
    db.session.expire_all()
    credential = db.session.scalars(select(Credential)).one()
    assert credential.version == 2
    assert credential.access_expires_at > datetime.now(UTC) + timedelta(hours=1)
    assert refresh_expiring_tokens()["due"] == 0


def test_short_lived_tokens_are_used_for_most_of_their_life(app_ctx, operator, sandbox):
    """A fixed margin as long as the token's lifetime would refresh before every call:
    margins shrink to a share of the lifetime (a quarter on demand, half for the sweep)."""
    now = datetime.now(UTC)  # a two-minute token, refreshed 30 s ago
    db.session.execute(update(Credential).values(
        refreshed_at=now - timedelta(seconds=30), access_expires_at=now + timedelta(seconds=90)))
    db.session.commit()
    since = last_seq(sandbox)
    assert token_for(app_ctx, operator.id)
    assert refresh_expiring_tokens()["due"] == 0
    assert [r for r in sandbox.requests_log(since) if r["path"] == "/oauth2/token"] == []

    db.session.execute(update(Credential).values(  # 50 s left: the sweep's turn
        refreshed_at=now - timedelta(seconds=70), access_expires_at=now + timedelta(seconds=50)))
    db.session.commit()
    assert refresh_expiring_tokens()["due"] == 1
    assert token_for(app_ctx, operator.id)  # on demand it is still good for 20 s more
    assert [r for r in sandbox.requests_log(since) if r["path"] == "/oauth2/token"] == []

    db.session.execute(update(Credential).values(  # 25 s left: on demand refreshes
        refreshed_at=now - timedelta(seconds=95), access_expires_at=now + timedelta(seconds=25)))
    db.session.commit()
    assert token_for(app_ctx, operator.id)
    assert len([r for r in sandbox.requests_log(since) if r["path"] == "/oauth2/token"]) == 1
