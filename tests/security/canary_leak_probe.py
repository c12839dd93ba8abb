"""Deliberate leaks, run only by ``test_secret_canary.py`` in a nested pytest session
under ``SECRET_CANARY=1``: each test passes, and the session must still fail because
the marker reached a log file, Redis and a plain database column.

The file name does not match ``test_*.py``: a normal run never collects it.
"""

from __future__ import annotations

import logging

from partner_app import audit
from partner_app.db import db
from partner_app.queueing import get_redis
from tests.security.canary import MARKER

LEAKED = f"at_{MARKER}_probe"


def test_leaks_into_a_log(app_ctx):
    logging.getLogger("partner_app.probe").warning("calling Stora with %s", LEAKED[:16])


def test_leaks_into_redis(app_ctx):
    get_redis(app_ctx).hset("rq:job:probe", "exc_info", f"ValueError: bad token {LEAKED}")


def test_leaks_into_a_plain_column(app_ctx):
    audit.record("probe.leak", actor_type="system", actor="probe", note=LEAKED)
    db.session.commit()
