"""The declarative base, column types shared by every model, and the session handle.

Timestamps are stored as naive UTC and returned timezone-aware, so SQLite (which keeps
no zone) and PostgreSQL behave the same way in Python.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import DateTime, MetaData, event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, registry
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that accepts only aware datetimes and always returns UTC-aware ones."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    registry = registry(metadata=MetaData(naming_convention=NAMING_CONVENTION),
                        type_annotation_map={datetime: UTCDateTime()})


db = SQLAlchemy(model_class=Base)


def insert_for(model):
    """``INSERT … ON CONFLICT`` for the session's database (PostgreSQL or SQLite).

    ``model`` is a mapped class or a table. Portable upserts and insert-if-absent
    without savepoints (pysqlite's SAVEPOINT handling commits outside a transaction).
    """
    dialect = db.session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"no INSERT … ON CONFLICT for {dialect}")


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    """Foreign keys on, WAL and a busy timeout so web and worker processes can share the file."""
    module = type(dbapi_connection).__module__
    if not module.startswith("sqlite3"):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


# A pooled connection idle for less than this is used without a liveness check.
PING_AFTER_IDLE_SECONDS = 1.0


def ping_when_idle(engine: Engine, *, after: float = PING_AFTER_IDLE_SECONDS) -> None:
    """Check a pooled connection's liveness at checkout only if it sat idle ``after``
    seconds or more (SQLAlchemy's ``pool_pre_ping`` checks every checkout).

    A job commits several times in quick succession (its claim, each page, its
    outcome), and each commit returns the connection to the pool: with the stock
    pre-ping every one of those transactions paid a ``SELECT 1`` round trip. A
    connection checked in a moment ago was alive a moment ago; the cost of trusting
    it is that a database restart within that second surfaces as one failed
    transaction (which jobs retry) instead of a silent reconnect. A failed check
    invalidates the pool, as ``pool_pre_ping`` does, and the pool reconnects.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection, record, proxy) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < after:
            return  # a new connection, or one in use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, None):
                raise exc.InvalidatePoolError() from error
            raise
