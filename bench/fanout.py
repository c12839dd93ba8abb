"""Fan-out benchmark: an orders sync over many operators with real workers.

    python -m bench.fanout [--operators 1000] [--pages 5] [--workers 4] [--latency-ms 20]

It starts its own ``stora_sandbox`` (``--set latency_ms=20``, Stora's rate limits of
10/s and 60/min per token), creates the operators through the sandbox admin API,
connects each one by driving ``/oauth2/authorize`` and ``/oauth2/token`` over HTTP (no
browser) and storing the tokens with the real ``store_token_set``, then runs one
``orders`` sync with W ``partner-app worker sync`` processes and reports:

* API calls per second against the bound ``min(W / latency, operators x 10/s)``: each
  worker makes one call at a time and no call is faster than the latency (target >= 0.8);
* failed jobs and 429s (target: none);
* the time to enqueue 10,000 rate-limited operator jobs the way the fan-out does
  (target ≤ 1 s);
* the peak RSS of a worker process and of a work-horse (target ≤ 150 MB).

The database comes from ``bench/harness.py``: PostgreSQL (a throwaway schema) when it
answers, else SQLite (``--sqlite`` forces it). Redis is this run's own embedded
redis-server, so no other process on the machine can touch the queues mid-run;
``--shared-redis`` uses the harness's instead (the machine's, db 12, flushed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench.harness import (
    ROOT,
    STORA_LIMITS,
    BenchEnv,
    named_cpu,
    obtain_token_set,
    tree_cpu,
    work_folder,
)

ORDERS_PATH = "/2025-09/orders"
STALL_SECONDS = 120
PAGE_SIZE = 100


# -- setup -------------------------------------------------------------------------------
def orders_for(pages: int) -> int:
    """Orders that take ``pages`` requests: the walk re-reads one record per page."""
    return PAGE_SIZE + (PAGE_SIZE - 1) * (pages - 2) + PAGE_SIZE // 2 if pages > 1 \
        else PAGE_SIZE // 2


def seed_operators(bench: BenchEnv, count: int, orders: int) -> list[dict]:
    return [bench.sandbox_operator(f"Bench Operator {index:05d}", sites=1, orders=orders)
            for index in range(count)]


def connect_operators(app, bench: BenchEnv, sandbox_operators: list[dict]) -> None:
    """Authorize every operator over HTTP (threads), then store each operator's tokens
    with the real ``store_token_set``."""
    from partner_app.connections.credentials import store_token_set
    from partner_app.connections.models import Operator, OperatorStatus
    from partner_app.db import db

    oauth = app.extensions["stora_oauth"]

    def grant(sandbox_operator: dict):
        tokens = obtain_token_set(bench, oauth, sandbox_operator)
        return tokens, oauth.token_info(tokens.access_token)

    with ThreadPoolExecutor(8) as pool:
        grants = list(pool.map(grant, sandbox_operators))
    now = datetime.now(UTC)
    for tokens, info in grants:
        operator = Operator(stora_identity=info.identity, name=info.operator_name,
                            status=OperatorStatus.ACTIVE, scopes=tokens.scope, connected_at=now)
        db.session.add(operator)
        db.session.flush()
        store_token_set(operator, tokens, vault=app.extensions["vault"], now=now)
    db.session.commit()


# -- measurements ------------------------------------------------------------------------
def measure_enqueue(app, count: int, batch: int = 500) -> float:
    """Seconds to enqueue ``count`` rate-limited operator jobs as the fan-out does: per
    batch of ``batch``, Lua calls streamed on one connection that skip existing ids (on
    a queue no worker listens to)."""
    from partner_app.queueing import get_queue
    from partner_app.sync import jobs as sync_jobs

    queue = get_queue("bench-enqueue", app)
    queue.get_redis_server_version()  # one INFO round trip, cached for every job after
    run_id = 999_999
    started = time.perf_counter()
    for start in range(0, count, batch):
        operator_ids = list(range(10_000_000 + start, 10_000_000 + min(count, start + batch)))
        sync_jobs.enqueue_operator_jobs(queue, run_id, operator_ids)
    return time.perf_counter() - started


class MemoryWatch:
    """Samples the RSS of the worker processes and their work-horses during the run, and
    reads each worker's lifetime high-water mark (VmHWM) at the end."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.peak_worker = 0
        self.peak_horse = 0
        self.hwm_worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for pid in self.pids:  # the kernel's own mark, start-up included
            self.hwm_worker = max(self.hwm_worker, _vm_hwm(pid))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self.pids:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    self.peak_worker = max(self.peak_worker, proc.memory_info().rss)
                    for child in proc.children():
                        with contextlib.suppress(psutil.Error):
                            self.peak_horse = max(self.peak_horse, child.memory_info().rss)


def _vm_hwm(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def process_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a child process: ours, with the run's settings on top, and no
    ``REDIS_URL`` of ours when the run uses its private Redis."""
    inherited = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return {**inherited, **env}


@contextlib.contextmanager
def workers(env: dict[str, str], count: int, logdir: Path) -> Iterator[list[subprocess.Popen]]:
    logs, procs = [], []
    for index in range(count):
        log = open(logdir / f"worker-{index}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "partner_app.cli", "worker", "sync",
             "--name", f"bench-{os.getpid()}-{index}"],
            env=process_env(env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def _wait_until_registered(app, count: int, procs: list[subprocess.Popen]) -> None:
    from rq import Worker

    from partner_app.queueing import get_redis

    deadline = time.monotonic() + 120
    while Worker.count(connection=get_redis(app)) < count:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("the workers did not start")
        time.sleep(0.1)
    time.sleep(0.5)  # past registration: the scheduler and pub/sub threads are up


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="op", desc="sync", disable=None, file=sys.stderr)


@dataclass
class RunResult:
    wall_seconds: float
    calls: int
    rate_limited: int
    call_window: float
    run_status: str
    succeeded: int
    failed: int
    failed_jobs: int
    worker_cpu: float
    sandbox_cpu: float
    postgres_cpu: float  # machine-wide, as is Redis's
    redis_cpu: float
    load: tuple[float, float]  # the machine's 1-minute load average at start and end


def _cpu_sample(procs: list[subprocess.Popen], sandbox_pid: int) -> list[float]:
    """CPU seconds so far: workers with their work-horses, the sandbox, PostgreSQL and
    Redis (the last two machine-wide)."""
    return [sum(tree_cpu(p.pid) for p in procs), tree_cpu(sandbox_pid),
            named_cpu("postgres"), named_cpu("redis-server")]


def run_sync(app, bench: BenchEnv, count: int, logdir: Path,
             total: int) -> tuple[RunResult, MemoryWatch]:
    from rq.registry import FailedJobRegistry
    from sqlalchemy import select

    from partner_app.db import db
    from partner_app.queueing import get_queue
    from partner_app.sync.models import SyncRun
    from partner_app.sync.services import start_sync

    with workers(bench.env, count, logdir) as procs:
        _wait_until_registered(app, count, procs)  # start-up is not part of the run
        since_seq = bench.request_seq()
        sandbox_pid = bench._sandbox.pid  # for its CPU time only
        cpu_before = _cpu_sample(procs, sandbox_pid)
        load_before = os.getloadavg()[0]
        with MemoryWatch([p.pid for p in procs]) as memory, _progress(total) as bar:
            started = time.monotonic()
            run = start_sync("orders", requested_by="bench", record_timeline=False)
            db.session.commit()
            run_id, shown, progressed = run.id, 0, time.monotonic()
            while True:
                row = db.session.execute(
                    select(SyncRun.status, SyncRun.succeeded, SyncRun.failed, SyncRun.skipped)
                    .where(SyncRun.id == run_id)).one()
                db.session.rollback()
                done = row.succeeded + row.failed + row.skipped
                if done != shown:
                    progressed = time.monotonic()
                bar.update(done - shown)
                shown = done
                if row.status != "running":
                    break
                if time.monotonic() - progressed > STALL_SECONDS:
                    raise RuntimeError(f"no progress for {STALL_SECONDS}s at {done}/{total}; "
                                       f"see the worker logs (--keep)")
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a worker exited; see {logdir}")
                time.sleep(0.2)
            wall = time.monotonic() - started
        cpu_after = _cpu_sample(procs, sandbox_pid)
        cpu = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
        failed_jobs = FailedJobRegistry(queue=get_queue("sync", app)).count
    log = [r for r in bench.requests_since(since_seq) if r["path"] == ORDERS_PATH]
    window = (max(r["at"] for r in log) - min(r["at"] for r in log)) if log else 0.0
    return RunResult(
        wall_seconds=wall, calls=len(log), rate_limited=sum(r["status"] == 429 for r in log),
        call_window=window, run_status=row.status, succeeded=row.succeeded, failed=row.failed,
        failed_jobs=failed_jobs, worker_cpu=cpu[0], sandbox_cpu=cpu[1], postgres_cpu=cpu[2],
        redis_cpu=cpu[3],
        load=(load_before, os.getloadavg()[0])), memory


# -- report ------------------------------------------------------------------------------
def _table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("measure", "value", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def report(args, result: RunResult, memory: MemoryWatch, enqueue_seconds: float,
           setup_seconds: float, backend: str) -> str:
    latency = args.latency_ms / 1000
    bound = min(args.workers / latency, args.operators * 10.0)
    # Each call takes at least the latency, so the window holds one latency more.
    achieved = result.calls / (result.call_window + latency) if result.calls else 0.0
    ratio = achieved / bound
    mb = 1024 * 1024

    def per_call(seconds: float) -> str:
        return f"{seconds / result.calls * 1000:.1f} ms" if result.calls else "-"

    def ok(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    # If every core did nothing but this run, calls could go no faster than this.
    cores = os.cpu_count() or 1
    cpu = (result.worker_cpu, result.sandbox_cpu, result.postgres_cpu, result.redis_cpu)
    ceiling = cores / (sum(cpu) / result.calls) if result.calls and sum(cpu) else 0.0

    rows = [
        ("operators x pages", f"{args.operators} x {args.pages}", "", ""),
        ("workers / latency", f"{args.workers} / {args.latency_ms} ms", "", ""),
        ("backend", backend, "", ""),
        ("API calls (orders)", str(result.calls), "", ""),
        ("run wall time", f"{result.wall_seconds:.1f} s", "", ""),
        ("achieved calls/s", f"{achieved:.1f}", "", ""),
        ("bound min(W/latency, ops*10/s)", f"{bound:.1f}", "", ""),
        ("ratio achieved / bound", f"{ratio:.2f}", ">= 0.80", ok(ratio >= 0.8)),
        ("run status", f"{result.run_status} ({result.succeeded} ok, {result.failed} failed)",
         "completed", ok(result.run_status == "completed")),
        ("failed jobs (RQ)", str(result.failed_jobs), "0", ok(result.failed_jobs == 0)),
        ("429 responses", str(result.rate_limited), "0", ok(result.rate_limited == 0)),
        (f"enqueue {args.enqueue_jobs:,} jobs", f"{enqueue_seconds:.2f} s", "<= 1.00 s",
         ok(enqueue_seconds <= 1.0)),
        ("peak RSS, worker process (run)", f"{memory.peak_worker / mb:.0f} MB", "<= 150 MB",
         ok(memory.peak_worker <= 150 * mb)),
        ("peak RSS, work-horse (run)", f"{memory.peak_horse / mb:.0f} MB", "<= 150 MB",
         ok(memory.peak_horse <= 150 * mb)),
        ("worker VmHWM (start-up incl.)", f"{memory.hwm_worker / mb:.0f} MB", "", ""),
        ("CPU: workers+horses / sandbox / postgres / redis",
         " / ".join(f"{c:.1f} s" for c in cpu), "",
         f"{cores} cores x {result.wall_seconds:.1f} s"),
        ("CPU per API call, same order", " / ".join(per_call(c) for c in cpu), "", ""),
        ("CPU per API call, all", per_call(sum(cpu)), "", ""),
        ("ceiling set by CPU (cores / CPU per call)",
         f"{ceiling:.1f} calls/s = {ceiling / bound:.2f} x bound", "",
         "the ratio this machine allows at this CPU cost"),
        ("load average at start / end", f"{result.load[0]:.1f} / {result.load[1]:.1f}", "",
         f"{cores} cores; other work shares them"),
        ("setup (not measured)", f"{setup_seconds:.1f} s", "", ""),
    ]
    return _table(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operators", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=5, help="order pages per operator")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (W)")
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--enqueue-jobs", type=int, default=10_000)
    parser.add_argument("--sqlite", action="store_true",
                        help="use SQLite even when PostgreSQL answers")
    parser.add_argument("--shared-redis", action="store_true",
                        help="use the harness's Redis (db 12 of the machine's) instead of "
                             "a private embedded one")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_folder("bench-fanout-", keep=args.keep) as workdir:
        bench = BenchEnv(str(workdir), sandbox_args=[
            "--set", f"latency_ms={args.latency_ms}", *STORA_LIMITS])
        if args.sqlite:
            bench.backend = "sqlite"
        with bench:
            from partner_app.queueing import get_redis

            if not args.shared_redis:
                # A private redis-server in the run's folder (the harness stops it).
                bench.env.pop("REDIS_URL", None)
                os.environ.pop("REDIS_URL", None)
            app = bench.app()
            setup_started = time.monotonic()
            with app.app_context():
                orders = orders_for(args.pages)
                print(f"seeding {args.operators} operators x {orders} orders…",
                      file=sys.stderr)
                created = seed_operators(bench, args.operators, orders)
                print("connecting them (authorize + token over HTTP)…", file=sys.stderr)
                connect_operators(app, bench, created)
                setup_seconds = time.monotonic() - setup_started
                result, memory = run_sync(app, bench, args.workers, workdir, args.operators)
                enqueue_seconds = measure_enqueue(app, args.enqueue_jobs)
                get_redis(app).flushdb()
            backend = bench.backends
        print(report(args, result, memory, enqueue_seconds, setup_seconds, backend))
        good = result.run_status == "completed" and result.failed_jobs == 0 \
            and result.rate_limited == 0
        return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
