"""Staff dashboard read pages at scale: the operators list and an operator's detail.

Seeds operators in bulk (with credentials, webhook subscriptions, inbox events, sync run
items, audit entries and timeline posts for each), signs a staff member in, and times
requests through the Flask test client: the whole WSGI stack in-process (routing, the
session and login, the queries, Jinja rendering), without a network or a server's
queueing. Two measures:

* the SQL statements each page issues at a small and at the full operator count, in the
  same run (target: equal; exit 1 otherwise);
* p95 server time of the operators list over every page position and filter, of an
  operator's detail, and of the events inbox (target: ≤ 150 ms), each also against the
  same page's p95 at the small count (the baseline).

    python -m bench.dashboard [--operators 10000] [--small 100] [--samples 300] [--sqlite]

Backends from ``bench/harness.py`` (PostgreSQL when it answers; Redis from
``BENCH_REDIS_URL``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bench.harness import BenchEnv

TARGET_MS = 150.0
EVENTS_PER_OPERATOR = 10
AUDIT_PER_OPERATOR = 3
TIMELINE_POSTS_PER_OPERATOR = 2
SYNC_RUNS = 3
CHUNK = 5000
STATUSES = (["active"] * 16) + ["degraded", "degraded", "needs_reauth", "disconnected"]
WORDS = ("Leeds", "Bristol", "Camden", "Box", "Self", "Store", "Storage", "City", "Secure",
         "Space", "Vault", "Depot", "Locker", "Unit", "North", "South", "Harbour", "Park")
STAFF_EMAIL = "bench@partner.example"
STAFF_PASSWORD = "bench-password-not-for-production"


def _chunks(rows: list[dict], size: int = CHUNK):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def seed(app, start: int, count: int, rng: random.Random) -> None:
    """Add ``count`` operators numbered from ``start`` and their rows, in bulk."""
    from sqlalchemy import insert, select
    from tqdm import tqdm

    from partner_app.audit import AuditEntry
    from partner_app.connections.models import Credential, Operator
    from partner_app.db import db
    from partner_app.security.models import DataKey
    from partner_app.sync.models import SyncRun, SyncRunItem
    from partner_app.timeline.models import TimelineEvent
    from partner_app.webhooks.models import WebhookEvent, WebhookSubscription

    now = datetime.now(UTC)
    with app.app_context(), tqdm(total=8, desc=f"seeding {count} operators", unit="table",
                                 file=sys.stderr) as bar:
        operators = []
        for n in range(start, start + count):
            name = f"{rng.choice(WORDS)} {rng.choice(WORDS)} {n}"
            operators.append({
                "public_id": f"op_{n:016x}", "status": rng.choice(STATUSES), "name": name,
                "storefront_host": f"store{n}.stora.test", "stora_identity": f"id:opr_{n:08d}",
                "scopes": "public.order:read public.contact:read", "refresh_failures": 0,
                "connected_at": now - timedelta(days=rng.randint(1, 400)),
                "last_api_success_at": now - timedelta(minutes=rng.randint(1, 600)),
                "created_at": now - timedelta(days=400) + timedelta(seconds=n),
                "updated_at": now})
        ids = []
        for chunk in _chunks(operators):
            ids += db.session.scalars(insert(Operator).returning(Operator.id), chunk).all()
        bar.update()
        keys = []
        for chunk in _chunks([{"operator_id": i, "wrapping_kid": "bench",
                               "wrapped_key": "bench-not-a-key", "version": 1,
                               "created_at": now} for i in ids]):
            keys += db.session.scalars(insert(DataKey).returning(DataKey.id), chunk).all()
        bar.update()
        db.session.execute(insert(Credential), [
            {"operator_id": i, "data_key_id": k, "access_token_ct": "v1.bench.placeholder",
             "refresh_token_ct": "v1.bench.placeholder", "version": 1, "scope": "",
             "access_expires_at": now + timedelta(minutes=rng.randint(-30, 120)),
             "refreshed_at": now - timedelta(minutes=rng.randint(0, 120))}
            for i, k in zip(ids, keys, strict=True)])
        bar.update()
        subs = [{"operator_id": i, "route_key": f"bench-{i}", "status": "active",
                 "url": f"https://partner.example/webhooks/stora/bench-{i}",
                 "event_types": ["order.created"], "create_idempotency_key": f"k{i}",
                 "version": 1, "created_at": now, "updated_at": now} for i in ids]
        for chunk in _chunks(subs):
            db.session.execute(insert(WebhookSubscription), chunk)
        bar.update()
        events = [{"operator_id": i, "event_id": f"evt_{i}_{e}", "event_type": "order.created",
                   "status": "failed" if rng.random() < 0.02 else "processed",
                   "signed_at": now, "received_at": now - timedelta(minutes=rng.randint(0, 9000)),
                   "body": '{"event":{"id":"evt","type":"order.created","data":{}}}',
                   "headers": {}, "deliveries": 1, "attempts": 1}
                  for i in ids for e in range(EVENTS_PER_OPERATOR)]
        for chunk in _chunks(events):
            db.session.execute(insert(WebhookEvent), chunk)
        bar.update()
        for chunk in _chunks([{"created_at": now - timedelta(days=a), "actor_type": "system",
                               "actor": "bench", "action": "operator.connected",
                               "operator_id": i, "detail": {"n": a}}
                              for i in ids for a in range(AUDIT_PER_OPERATOR)]):
            db.session.execute(insert(AuditEntry), chunk)
        bar.update()
        for chunk in _chunks([{"operator_id": i, "action_key": f"order.created:ord_{i}_{t}",
                               "request": {"template": "Action performed"},
                               "status": "recorded", "attempts": 1, "key_generation": 0,
                               "created_at": now, "recorded_at": now}
                              for i in ids for t in range(TIMELINE_POSTS_PER_OPERATOR)]):
            db.session.execute(insert(TimelineEvent), chunk)
        bar.update()
        run_ids = db.session.scalars(select(SyncRun.id)).all()
        for _ in range(SYNC_RUNS - len(run_ids)):
            run = SyncRun(name="orders", requested_by="bench", status="completed",
                          started_at=now, finished_at=now)
            db.session.add(run)
            db.session.flush()
            run_ids.append(run.id)
        for run_id in run_ids:
            for chunk in _chunks([{"run_id": run_id, "operator_id": i, "status": "succeeded",
                                   "attempts": 1, "records": 100, "new_records": 3, "pages": 1,
                                   "new_by_site": {}, "updated_at": now, "started_at": now,
                                   "finished_at": now} for i in ids]):
                db.session.execute(insert(SyncRunItem), chunk)
        bar.update()
        db.session.commit()
        db.session.execute(db.text("ANALYZE"))  # fresh planner statistics, as in production
        db.session.commit()


def sign_in(app):
    from partner_app.db import db
    from partner_app.security.staff import create_staff

    with app.app_context():
        create_staff(STAFF_EMAIL, STAFF_PASSWORD, role="viewer", actor="cli")
        db.session.commit()
    client = app.test_client()
    page = client.get("/staff/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    resp = client.post("/staff/login", data={"email": STAFF_EMAIL, "password": STAFF_PASSWORD,
                                              "csrf_token": token})
    assert resp.status_code == 302, "sign-in failed"
    return client


class StatementCounter:
    def __init__(self, app):
        from partner_app.db import db

        with app.app_context():
            self.engine = db.engine
        self.count = 0

    def __enter__(self):
        from sqlalchemy import event

        self.count = 0
        event.listen(self.engine, "before_cursor_execute", self._hit)
        return self

    def __exit__(self, *exc):
        from sqlalchemy import event

        event.remove(self.engine, "before_cursor_execute", self._hit)

    def _hit(self, *args):
        self.count += 1


def operator_ids(app) -> tuple[list[int], list[str]]:
    from sqlalchemy import select

    from partner_app.connections.models import Operator
    from partner_app.db import db

    with app.app_context():
        rows = db.session.execute(select(Operator.id, Operator.public_id)).all()
        return [r[0] for r in rows], [r[1] for r in rows]


def list_paths(app, rng: random.Random, n: int) -> list[str]:
    """Operators-list requests over every page position and filter."""
    ids, public_ids = operator_ids(app)
    low, high = min(ids), max(ids)
    statuses = sorted(set(STATUSES))
    paths = []
    for _ in range(n):
        kind = rng.randrange(7)
        cursor = rng.randint(low, high + 1)
        if kind == 0:
            paths.append("/staff/operators")
        elif kind == 1:
            paths.append(f"/staff/operators?before={cursor}")
        elif kind == 2:
            paths.append(f"/staff/operators?after={cursor}")
        elif kind == 3:
            paths.append(f"/staff/operators?status={rng.choice(statuses)}&before={cursor}")
        elif kind == 4:
            paths.append(f"/staff/operators?q={rng.choice(WORDS).lower()}&before={cursor}")
        elif kind == 5:
            paths.append(f"/staff/operators?q={rng.choice(public_ids)}")
        else:
            paths.append(f"/staff/operators?q=store{rng.randint(0, len(ids))}.stora"
                         f"&status={rng.choice(statuses)}")
    return paths


def detail_paths(app, rng: random.Random, n: int) -> list[str]:
    _, public_ids = operator_ids(app)
    return [f"/staff/operators/{rng.choice(public_ids)}" for _ in range(n)]


def event_paths(app, rng: random.Random, n: int) -> list[str]:
    _, public_ids = operator_ids(app)
    options: list[Callable[[], str]] = [
        lambda: "/staff/events",
        lambda: "/staff/events?status=failed",
        lambda: f"/staff/events?operator={rng.choice(public_ids)}",
        lambda: "/staff/events?type=order.created&status=processed",
    ]
    return [rng.choice(options)() for _ in range(n)]


def timed(client, paths: list[str]) -> list[float]:
    for path in paths[:10]:  # warm-up: template compilation, statement caches
        client.get(path)
    times = []
    for path in paths:
        began = time.perf_counter()
        resp = client.get(path)
        times.append((time.perf_counter() - began) * 1000)
        assert resp.status_code == 200, (path, resp.status_code)
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def statement_counts(app, client, paths: dict[str, str]) -> dict[str, int]:
    counter = StatementCounter(app)
    counts = {}
    for label, path in paths.items():
        client.get(path)  # the first request of a kind may load caches
        with counter:
            assert client.get(path).status_code == 200
        counts[label] = counter.count
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--operators", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--sqlite", action="store_true")
    args = parser.parse_args()
    rng = random.Random(5)
    with tempfile.TemporaryDirectory() as workdir:
        bench = BenchEnv(workdir)
        if args.sqlite:
            bench.backend = "sqlite"
        with bench:
            app = bench.app()
            client = sign_in(app)
            results: dict[str, dict] = {}
            for stage, total in (("small", args.small), ("full", args.operators)):
                ids, _ = operator_ids(app)
                seed(app, len(ids), total - len(ids), rng)
                _, public_ids = operator_ids(app)
                probe = public_ids[len(public_ids) // 2]
                counts = statement_counts(app, client, {
                    "list, first page": "/staff/operators",
                    "list, deep page": f"/staff/operators?before={len(public_ids) // 2}",
                    "list, status filter": "/staff/operators?status=degraded",
                    "list, search": "/staff/operators?q=vault",
                    "operator detail": f"/staff/operators/{probe}",
                    "events": "/staff/events",
                    "events, operator filter": f"/staff/events?operator={probe}"})
                samples = max(50, args.samples // (3 if stage == "small" else 1))
                results[stage] = {
                    "operators": total, "counts": counts,
                    "list": timed(client, list_paths(app, rng, samples)),
                    "detail": timed(client, detail_paths(app, rng, samples)),
                    "events": timed(client, event_paths(app, rng, samples))}
            small, full = results["small"], results["full"]
            print(f"\nbackend: {bench.backend}; server time = Flask test client, in-process, "
                  f"full WSGI stack; {args.samples} requests per page kind at full size\n")
            sizes = f"{small['operators']:>10,}{full['operators']:>10,}"
            print(f"{'SQL statements per page':<28}{sizes}   equal?")
            equal = True
            for label, count in small["counts"].items():
                same = count == full["counts"][label]
                equal &= same
                print(f"  {label:<26}{count:>10}{full['counts'][label]:>10}   "
                      f"{'yes' if same else 'NO'}")
            print(f"\n{'p95 server time (ms)':<28}{sizes}"
                  f"{'ratio to small':>16}{'ratio to target':>17}")
            speed_ok = True
            for kind, label in (("list", "operators list"), ("detail", "operator detail"),
                                ("events", "events inbox")):
                small_p95, full_p95 = p95(small[kind]), p95(full[kind])
                speed_ok &= full_p95 <= TARGET_MS
                print(f"  {label:<26}{small_p95:>10.1f}{full_p95:>10.1f}"
                      f"{full_p95 / small_p95:>16.2f}{full_p95 / TARGET_MS:>17.2f}"
                      f"   median {statistics.median(full[kind]):.1f}, "
                      f"max {max(full[kind]):.1f}")
            print(f"\ntarget: p95 <= {TARGET_MS:.0f} ms "
                  f"({'met' if speed_ok else 'MISSED'}); statements per page constant "
                  f"({'met' if equal else 'MISSED'}); load average {os.getloadavg()[0]:.2f}")
            return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
