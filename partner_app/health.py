"""``/healthz`` (the process answers) and ``/readyz`` (it can do its work).

``/readyz`` checks, in parallel and within ``CHECK_TIMEOUT`` seconds in all:

* ``database``: a connection and ``SELECT 1``;
* ``redis``: ``PING``;
* ``migrations``: the database's Alembic revision is the head of ``migrations/``.

200 ``{"ok": true, "checks": {...: "ok"}}`` when every check passes, else 503 with the
failed checks named (``unreachable``, ``timeout``, ``behind``, ``not_migrated``,
``unknown_revision``, ``not_checked``). Never an exception text: a driver's message may
hold a URL with a password.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from flask import Blueprint, Flask, current_app, jsonify

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)

CHECK_TIMEOUT = 2.0
OK = "ok"


@bp.get("/healthz")
def healthz():
    return {"ok": True}


@bp.get("/readyz")
def readyz():
    checks = run_checks(current_app._get_current_object())
    ok = all(result == OK for result in checks.values())
    if not ok:
        log.warning("readyz.failed", extra={
            "failed": ",".join(sorted(k for k, v in checks.items() if v != OK))})
    response = jsonify(ok=ok, checks=checks)
    response.status_code = 200 if ok else 503
    response.headers["Cache-Control"] = "no-store"
    return response


@functools.cache
def _script(directory: str) -> ScriptDirectory:
    return ScriptDirectory(directory)


def migration_state(current: tuple[str, ...], script: ScriptDirectory) -> str:
    """``ok`` when the database is at the script's heads, else why not."""
    if set(current) == set(script.get_heads()):
        return OK
    if not current:
        return "not_migrated"
    try:
        for revision in current:
            if script.get_revision(revision) is None:
                return "unknown_revision"
    except CommandError:
        return "unknown_revision"  # migrated by newer code than this process runs
    return "behind"


def _database_and_migrations(app: Flask) -> dict[str, str]:
    from partner_app import MIGRATIONS_DIR
    from partner_app.db import db

    with app.app_context(), db.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text(f"SET LOCAL statement_timeout = {int(CHECK_TIMEOUT * 1000)}"))
        conn.execute(sa.text("SELECT 1"))
        current = tuple(MigrationContext.configure(conn).get_current_heads())
    return {"database": OK, "migrations": migration_state(current, _script(MIGRATIONS_DIR))}


def _redis(app: Flask) -> dict[str, str]:
    from partner_app.queueing import get_redis

    get_redis(app).ping()
    return {"redis": OK}


# name(s) reported when a check fails, the check
CHECKS: tuple[tuple[tuple[str, ...], Callable[[Flask], dict[str, str]]], ...] = (
    (("database", "migrations"), _database_and_migrations),
    (("redis",), _redis),
)


def run_checks(app: Flask, timeout: float = CHECK_TIMEOUT) -> dict[str, str]:
    """Run every check in its own thread; whatever has not answered by ``timeout`` is
    ``timeout`` (a hung connect cannot hold the probe)."""
    results: dict[str, str] = {}
    lock = threading.Lock()

    def run(names: tuple[str, ...], check: Callable[[Flask], dict[str, str]]) -> None:
        try:
            outcome = check(app)
        except Exception as exc:
            log.info("readyz.check_failed", extra={"check": names[0],
                                                   "error": type(exc).__name__})
            outcome = {names[0]: "unreachable",
                       **{name: "not_checked" for name in names[1:]}}
        with lock:
            results.update(outcome)

    threads = [threading.Thread(target=run, args=item, daemon=True, name=f"readyz-{item[0][0]}")
               for item in CHECKS]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        final = dict(results)
    for names, _check in CHECKS:
        if names[0] not in final:
            final[names[0]] = "timeout"
            for name in names[1:]:
                final[name] = "not_checked"
    return {name: final[name] for names, _ in CHECKS for name in names}
