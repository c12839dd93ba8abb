"""``db.ping_when_idle``: a pooled connection is checked at checkout only after sitting
idle, against a real PostgreSQL whose server side ends the session in between."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from partner_app.db import ping_when_idle
from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "services",
                                reason="needs a database server to end sessions")

IDLE = 0.3


@pytest.fixture
def engine(backend_urls):
    engine = sa.create_engine(backend_urls["database_url"], pool_size=1, max_overflow=0)
    ping_when_idle(engine, after=IDLE)
    yield engine
    engine.dispose()


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()


def _end_session(backend_urls, pid: int) -> None:
    admin = sa.create_engine(backend_urls["database_url"], poolclass=sa.NullPool)
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    admin.dispose()


def test_an_idle_connection_the_server_ended_is_replaced_at_checkout(engine, backend_urls):
    pid = _backend_pid(engine)
    _end_session(backend_urls, pid)
    time.sleep(IDLE + 0.1)
    assert _backend_pid(engine) != pid  # pinged, found dead, reconnected: no error


def test_a_connection_used_a_moment_ago_is_trusted_without_a_round_trip(engine,
                                                                        backend_urls):
    pid = _backend_pid(engine)
    _end_session(backend_urls, pid)
    # Checked in moments ago: no ping, so the dead session surfaces as this one error…
    with pytest.raises(sa.exc.OperationalError) as failed:
        _backend_pid(engine)
    assert failed.value.connection_invalidated
    # …and the pool has already replaced it.
    assert _backend_pid(engine) != pid
