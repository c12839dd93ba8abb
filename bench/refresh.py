"""Single-flight refresh under a thundering herd.

100 callers (processes x threads) ask at the same instant for the token of one
operator whose access token has just expired. Prints how many token requests reached
Stora (target: exactly 1) and the latency the refresh added: the herd latency
minus the same herd's latency when the token is fresh (measured in the same run, same
processes, warm pools), compared with one token round trip measured in the same run
(target: added ≤ one round trip + 50 ms).

    python -m bench.refresh [--callers 100] [--processes 4] [--latency-ms 50]

Uses PostgreSQL (a throwaway schema in database ``test``) when it answers on
127.0.0.1:5432, else SQLite; the machine's Redis or the embedded one; a sandbox
process it starts itself.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta

from bench.harness import BenchEnv, obtain_token_set

SPAWN = multiprocessing.get_context("spawn")


ROUNDS = ("warm-up", "fresh token", "expired token")


def _caller_process(env: dict[str, str], operator_id: int, threads: int,
                    starts: list[float], results) -> None:
    os.environ.update(env)
    from partner_app import create_app
    from partner_app.connections.tokens import get_access_token
    from partner_app.queueing import get_redis
    from partner_app.settings import Settings

    app = create_app(Settings.from_env(env))
    redis = get_redis(app)

    def call(round_no: int) -> None:
        with app.app_context():
            time.sleep(max(0.0, starts[round_no] - time.time()))
            began = time.perf_counter()
            try:
                get_access_token(operator_id, vault=app.extensions["vault"],
                                 oauth=app.extensions["stora_oauth"], redis=redis)
                results.put((round_no, "ok", time.perf_counter() - began))
            except Exception as exc:
                results.put((round_no, "error", f"{type(exc).__name__}: {exc}"))

    for round_no in range(len(starts)):
        workers = [threading.Thread(target=call, args=(round_no,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--latency-ms", type=int, default=50,
                        help="latency the sandbox adds to every request (a real network)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, BenchEnv(tmp, sandbox_args=[
            "--set", f"latency_ms={args.latency_ms}",
            "--set", "revocation_mode=immediate"]) as bench:
        app = bench.app()
        with app.app_context():
            from sqlalchemy import update

            from partner_app.connections.credentials import store_token_set
            from partner_app.connections.models import Credential, Operator, OperatorStatus
            from partner_app.db import db

            oauth = app.extensions["stora_oauth"]
            operator = Operator(name="Herd Storage", stora_identity="name:Herd Storage",
                                status=OperatorStatus.ACTIVE, connected_at=datetime.now(UTC))
            db.session.add(operator)
            db.session.flush()
            sandbox_op = bench.sandbox_operator("Herd Storage")
            store_token_set(operator, obtain_token_set(bench, oauth, sandbox_op),
                            vault=app.extensions["vault"], now=datetime.now(UTC))
            db.session.commit()

            # Baseline: one token round trip, measured now, against the same sandbox.
            spare = obtain_token_set(bench, oauth, sandbox_op)
            round_trips = []
            for _ in range(5):
                began = time.perf_counter()
                spare = oauth.refresh(spare.refresh_token)
                round_trips.append(time.perf_counter() - began)
            round_trip = statistics.median(round_trips)

            operator_id = operator.id

        per_process = [args.callers // args.processes] * args.processes
        per_process[0] += args.callers - sum(per_process)
        first = time.time() + 6.0  # every process has built its app by then
        starts = [first, first + 3.0, first + 6.0]
        results = SPAWN.Queue()
        procs = [SPAWN.Process(target=_caller_process,
                               args=(bench.env, operator_id, n, starts, results))
                 for n in per_process]
        for proc in procs:
            proc.start()
        time.sleep(max(0.0, starts[2] - 1.5 - time.time()))
        with app.app_context():
            db.session.execute(update(Credential).where(Credential.operator_id == operator_id)
                               .values(access_expires_at=datetime.now(UTC)
                                       - timedelta(seconds=1)))
            db.session.commit()
        since = bench.request_seq()
        outcomes = [results.get(timeout=120) for _ in range(args.callers * len(starts))]
        for proc in procs:
            proc.join(30)
        token_requests = [r for r in bench.requests_since(since)
                          if r["path"] == "/oauth2/token"]

    errors = [detail for _, kind, detail in outcomes if kind == "error"]
    latency = {n: sorted(v for r, kind, v in outcomes if r == n and kind == "ok")
               for n in range(len(ROUNDS))}
    fresh, herd = latency[1], latency[2]
    added_p50 = statistics.median(herd) - statistics.median(fresh)
    added_max = herd[-1] - fresh[-1]
    print(f"backend                   {bench.backend}")
    print(f"callers                   {args.callers} ({args.processes} processes)")
    print(f"token requests            {len(token_requests)}   (target 1)")
    print(f"errors                    {len(errors)}")
    print(f"token round trip          {round_trip * 1000:7.1f} ms (median of 5, same run)")
    for n in (1, 2):
        print(f"herd, {ROUNDS[n]:<14} p50 {statistics.median(latency[n]) * 1000:7.1f} ms"
              f"   max {latency[n][-1] * 1000:7.1f} ms")
    print(f"added by the refresh      p50 {added_p50 * 1000:7.1f} ms   max "
          f"{added_max * 1000:7.1f} ms   (target <= round trip + 50 ms = "
          f"{(round_trip + 0.05) * 1000:.1f} ms)")
    worst = max(added_p50, added_max)
    print(f"ratio added/(rt + 50 ms)  {worst / (round_trip + 0.05):7.2f}   (target <= 1)")
    for detail in errors[:3]:
        print("  error:", detail)
    ok = (len(token_requests) == 1 and not errors
          and max(added_p50, added_max) <= round_trip + 0.05)
    print("PASS" if ok else "MISS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
