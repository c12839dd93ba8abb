"""The webhook receiver's own connection pool: autocommit, no liveness ping.

A delivery is stored by one ``INSERT … ON CONFLICT`` that is atomic by itself, so the
receiver runs it in autocommit: one round trip to the database where the app's session
costs up to four (a liveness ping for a connection that sat idle, ``BEGIN``, the
statement, ``COMMIT``). Receipt is the platform's hottest path and Stora waits on it,
so it gets its own small pool.

Without a ping, a connection the server dropped (a restart, a failover) fails
its first statement instead of being replaced at checkout. ``run`` then retries the
work once on a fresh connection: SQLAlchemy has already invalidated the pool's older
connections by then, and storing is idempotent (a second attempt of an insert whose
first attempt did commit counts one more delivery of the same event, nothing else).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from flask import Flask
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError

T = TypeVar("T")

_EXTENSION = "webhook_receipt_engine"
APPLICATION_NAME = "partner-app webhook receipt"


def engine_for(app: Flask, main: Engine) -> Engine:
    """This process's receipt engine for ``app`` (the same database as ``main``).

    Made on first use in each process: an engine's pooled connections must not cross
    a fork (gunicorn forks its workers after importing the app). On SQLite, the app's
    own engine in autocommit mode."""
    held = app.extensions.get(_EXTENSION)
    if held is not None and held[0] == os.getpid():
        return held[1]
    backend = main.url.get_backend_name()
    if backend == "sqlite":
        # No server, so no round trips to save: autocommit on the app's own pool, whose
        # connections the app (and the test-suite) closes together.
        engine = main.execution_options(isolation_level="AUTOCOMMIT")
    else:
        if held is not None:
            held[1].dispose(close=False)  # the parent's connections: leave them to it
        # Named in pg_stat_activity, so a DBA can tell the receiver's sessions apart.
        connect_args = {"application_name": APPLICATION_NAME} if backend == "postgresql" else {}
        # Parameters hidden as on the app's engine: a failed insert's error (logged)
        # would otherwise carry the delivery's body, with the customer's details.
        engine = create_engine(main.url, isolation_level="AUTOCOMMIT", pool_pre_ping=False,
                               pool_size=4, max_overflow=4, connect_args=connect_args,
                               hide_parameters=True)
    app.extensions[_EXTENSION] = (os.getpid(), engine)
    return engine


def run(engine: Engine, work: Callable[[Connection], T]) -> tuple[T, bool]:
    """``work(conn)`` on an autocommit connection; once more on a fresh one if the
    first connection turned out to be dead. Returns (result, retried). Any other
    database error, or a second lost connection, is raised."""
    try:
        with engine.connect() as conn:
            return work(conn), False
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    with engine.connect() as conn:
        return work(conn), True
