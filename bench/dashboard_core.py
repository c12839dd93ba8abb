"""The staff dashboard's platform-wide pages at scale: overview, jobs, audit log, staff.

    python -m bench.dashboard_core [--operators 10000] [--small 100] [--requests 100] [--sqlite]

Seeds a small platform (``--small`` operators) and measures every page, then grows it to
``--operators`` (with 20 audit entries and 10 webhook deliveries per operator, spread
over a week, 30 sync runs, 60 failed RQ jobs, 25 staff accounts) and measures again in
the same run. Each page is fetched through the real app (Flask's test client, in
process: the figure is server time without the network), signed in as an admin through
the real sign-in form. The audit log is measured on its first page, on pages deep in
the log (keyset ``before``) and under each filter.

Reports per page: SQL statements at both sizes (a correctness target: they must be
equal, or the page does work per row), p50/p95 milliseconds at both sizes, the ratio of
the large p95 to the small p95 (the baseline, measured in this run), and the ratio of
the large p95 to the 150 ms target. Exits 1 if a statement count differs.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import event, func, insert, select

from bench.harness import BenchEnv

TARGET_P95_MS = 150.0
PASSWORD = "bench-staff-password"
STATES = ("active", "active", "active", "degraded", "needs_reauth", "pending", "disconnected")
ACTIONS = ("token.refreshed", "token.refreshed", "token.refreshed", "operator.connected",
           "webhooks.reconciled", "token.refresh_failed")


def seed(app, first: int, count: int, now: datetime) -> None:
    """Operators ``first`` .. ``first + count - 1`` with their audit rows and events."""
    from partner_app.audit import AuditEntry
    from partner_app.connections.models import Operator
    from partner_app.db import db
    from partner_app.webhooks.models import WebhookEvent

    rng = random.Random(first)
    week = 7 * 24 * 3600
    with app.app_context():
        for start in range(first, first + count, 2000):
            ids = range(start, min(start + 2000, first + count))
            db.session.execute(insert(Operator), [
                {"id": i, "public_id": f"op_{i:016x}", "status": STATES[i % len(STATES)],
                 "name": f"Operator {i}", "created_at": now} for i in ids])
            db.session.execute(insert(AuditEntry), [
                {"created_at": now - timedelta(seconds=rng.randrange(week)),
                 "actor_type": "system",
                 "actor": "token-refresh" if k % 4 else f"s{k % 7}@p.example",
                 "action": ACTIONS[(i + k) % len(ACTIONS)], "operator_id": i,
                 "detail": {"k": k}}
                for i in ids for k in range(20)])
            db.session.execute(insert(WebhookEvent), [
                {"operator_id": i, "event_id": f"ev_{i}_{k}", "event_type": "order.created",
                 "status": "failed" if (i + k) % 25 == 0 else "processed", "signed_at": now,
                 "received_at": now - timedelta(seconds=rng.randrange(week)), "body": "{}",
                 "headers": {}} for i in ids for k in range(10)])
            db.session.commit()


def seed_extras(app, now: datetime) -> None:
    """Sync runs, failed jobs in RQ, staff accounts: what the jobs and staff pages list."""
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    from partner_app.db import db
    from partner_app.queueing import get_redis
    from partner_app.security.staff import create_staff
    from partner_app.sync.models import SyncRun

    with app.app_context():
        db.session.execute(insert(SyncRun), [
            {"name": "orders", "requested_by": "cron", "status": "running", "total": 10000,
             "succeeded": 300 * i, "failed": i, "skipped": 0, "record_timeline": False,
             "started_at": now - timedelta(minutes=i)} for i in range(30)])
        for i in range(25):
            create_staff(f"member{i}@p.example", PASSWORD, role="viewer", actor="cli")
        db.session.commit()
        redis = get_redis(app)
    logging.getLogger("rq").setLevel(logging.CRITICAL)  # 60 expected tracebacks
    queue = Queue("default", connection=redis, serializer=JSONSerializer)
    for i in range(60):  # outside an app context these jobs fail, as on a broken worker
        queue.enqueue("partner_app.connections.jobs.refresh_operator_token", 1 + i)
    SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(burst=True)


def signed_in_client(app):
    import re

    from partner_app.db import db
    from partner_app.security.staff import create_staff

    with app.app_context():
        create_staff("bench-admin@p.example", PASSWORD, role="admin", actor="cli")
        db.session.commit()
    client = app.test_client()
    page = client.get("/staff/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    response = client.post("/staff/login", data={"csrf_token": token,
                                                 "email": "bench-admin@p.example",
                                                 "password": PASSWORD})
    assert response.status_code == 302, "the bench admin could not sign in"
    return client


def pages(app, rng: random.Random) -> dict[str, list[str]]:
    """Page name -> the URLs to cycle through (random depths and filter values)."""
    from partner_app.audit import AuditEntry
    from partner_app.connections.models import Operator
    from partner_app.db import db

    with app.app_context():
        top = db.session.scalar(select(func.max(AuditEntry.id)))
        operators = db.session.scalar(select(func.max(Operator.id)))
    today = datetime.now(UTC).date()
    return {
        "overview": ["/staff/"],
        "jobs": ["/staff/jobs"],
        "staff": ["/staff/accounts"],
        "audit, first page": ["/staff/audit"],
        "audit, deep pages": [f"/staff/audit?before={rng.randrange(2, top)}" for _ in range(50)],
        "audit, by actor": [f"/staff/audit?actor=s{rng.randrange(7)}@p.example"
                            f"&before={rng.randrange(2, top)}" for _ in range(50)],
        "audit, by action": [f"/staff/audit?action={rng.choice(ACTIONS)}" for _ in range(10)],
        "audit, by operator": [f"/staff/audit?operator=op_{rng.randrange(1, operators):016x}"
                               for _ in range(50)],
        "audit, date range": [f"/staff/audit?since={today - timedelta(days=d)}"
                              f"&until={today - timedelta(days=d)}" for d in range(7)],
    }


def measure(app, client, urls: list[str], requests: int) -> tuple[int, list[float]]:
    from partner_app.db import db

    with app.app_context():
        engine = db.engine
    seen: list[int] = []

    def count(*_args) -> None:
        seen.append(1)

    assert client.get(urls[0]).status_code == 200  # warm
    statements = None
    timings = []
    for n in range(requests):
        url = urls[n % len(urls)]
        seen.clear()
        event.listen(engine, "before_cursor_execute", count)
        started = time.perf_counter()
        response = client.get(url)
        timings.append((time.perf_counter() - started) * 1000)
        event.remove(engine, "before_cursor_execute", count)
        assert response.status_code == 200, (url, response.status_code)
        if statements is None:
            statements = len(seen)
        elif len(seen) != statements:
            statements = max(statements, len(seen))  # report the worst
    return statements or 0, timings


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operators", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100, help="per page and size")
    parser.add_argument("--sqlite", action="store_true", help="SQLite even if PostgreSQL answers")
    args = parser.parse_args(argv)
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as workdir:
        bench = BenchEnv(workdir)
        if args.sqlite:
            bench.backend = "sqlite"
        with bench:
            app = bench.app()
            now = datetime.now(UTC)
            print(f"backend: {bench.backend}; seeding {args.small} operators …", flush=True)
            seed(app, 1, args.small, now)
            seed_extras(app, now)
            client = signed_in_client(app)
            small = {name: measure(app, client, urls, args.requests)
                     for name, urls in pages(app, rng).items()}
            started = time.monotonic()
            print(f"growing to {args.operators} operators …", flush=True)
            seed(app, args.small + 1, args.operators - args.small, now)
            if bench.backend == "postgresql":
                with app.app_context():
                    from partner_app.db import db

                    with db.engine.connect().execution_options(
                            isolation_level="AUTOCOMMIT") as conn:
                        conn.exec_driver_sql("ANALYZE")
            print(f"  seeded in {time.monotonic() - started:.1f} s", flush=True)
            large = {name: measure(app, client, urls, args.requests)
                     for name, urls in pages(app, rng).items()}

    header = (f"{'page':<20} {'stmts':>11} {'p50 ms':>15} {'p95 ms':>15} "
              f"{'p95 large/small':>16} {'p95 / 150 ms':>13}")
    print(f"\n{args.small} -> {args.operators} operators, {args.requests} requests per page "
          f"and size (Flask test client, in process)\n{header}")
    failed = False
    for name in small:
        (s_stmts, s_times), (l_stmts, l_times) = small[name], large[name]
        failed |= s_stmts != l_stmts
        print(f"{name:<20} {s_stmts:>4} -> {l_stmts:<4}"
              f" {statistics.median(s_times):>6.1f} -> {statistics.median(l_times):<6.1f}"
              f" {p95(s_times):>6.1f} -> {p95(l_times):<6.1f}"
              f" {p95(l_times) / p95(s_times):>16.2f} {p95(l_times) / TARGET_P95_MS:>13.2f}"
              f"{'  STATEMENTS GREW' if s_stmts != l_stmts else ''}")
    worst = max(p95(times) for _, times in large.values())
    print(f"\nworst p95 at {args.operators} operators: {worst:.1f} ms "
          f"(target <= {TARGET_P95_MS:.0f} ms: {'met' if worst <= TARGET_P95_MS else 'MISSED'})")
    print("statements per page constant: " + ("NO" if failed else "yes"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
