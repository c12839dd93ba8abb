"""Soak: the scheduler and four workers on many operators with two-minute tokens, under
worker kills and token-endpoint failures, for a fixed time.

    python -m bench.soak [--duration 30m] [--operators 10000] [--workers 4]
                         [--access-ttl 120] [--token-5xx 0.01] [--kill-every 120]

It starts its own ``stora_sandbox`` (access tokens live ``--access-ttl`` seconds,
Stora's 10/s and 60/min limits per token), creates and connects the operators over HTTP
(no browser; tokens stored by the real ``store_token_set``), then runs ``partner-app
cron`` (orders sync every ``--orders-every``, proactive refresh every
``--refresh-every``) and W ``partner-app worker`` processes until ``--duration`` is
up. Meanwhile:

* a random worker (never the first: it is the memory sentinel) is SIGKILLed, work-horse
  included, about every ``--kill-every`` seconds, and a fresh one started;
* about ``--token-5xx`` of the refresh requests at Stora's token endpoint answer 500,
  502 or 503 (queued one at a time as refresh traffic arrives);
* the sandbox's request log is read every second and cleared once it holds
  ``--clear-after`` entries (a request logged between that read and the clear goes
  unobserved; sequence numbers count them), and the RSS of the sentinel worker, the cron
  and the sandbox is sampled every ``--sample-every`` seconds.

It reports, with targets:

* API calls answered 401 (an expired or superseded token used): 0, as a share of all
  API calls;
* operators ``needs_reauth`` at the end: 0 (no grant was revoked, so there is no cause);
* the RSS slope of the sentinel worker and of the cron after the warm-up (least squares,
  MB per hour) and the growth it projects over the run against the RSS at the end of
  the warm-up, the baseline measured in the same run: <= 5 %;
* for information: token requests per API call, injected 5xx against token requests,
  kills, operators ``degraded`` at the end, sync runs completed, failed RQ jobs.

Exit status 1 when a correctness target is missed. Backends as ``bench/harness.py``
(PostgreSQL when it answers, else SQLite; the machine's Redis db 12, else embedded).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.fanout import connect_operators, process_env
from bench.harness import ROOT, STORA_LIMITS, BenchEnv, work_folder

API_PREFIX = "/2025-09/"
TOKEN_PATH = "/oauth2/token"
FAULT_STATUSES = (500, 502, 503)
GROWTH_TARGET = 0.05


# -- the fleet -----------------------------------------------------------------------------
class Fleet:
    """The cron and the workers, each in its own session so a kill takes its children."""

    def __init__(self, env: dict[str, str], logdir: Path, args: argparse.Namespace):
        self.env = process_env(env)
        self.logdir = logdir
        self.args = args
        self.workers: list[subprocess.Popen] = []
        self.cron: subprocess.Popen | None = None
        self._spawned = 0
        self._logs: list = []

    def _spawn(self, label: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{label}.log", "w")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        return subprocess.Popen([sys.executable, "-m", "partner_app.cli", *argv],
                                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_worker(self) -> subprocess.Popen:
        self._spawned += 1
        label = f"worker-{self._spawned}"
        proc = self._spawn(label, ["worker", "--name", f"soak-{os.getpid()}-{self._spawned}"])
        self.workers.append(proc)
        return proc

    def start(self) -> None:
        self.cron = self._spawn("cron", [
            "cron", "--orders-every", self.args.orders_every,
            "--refresh-every", self.args.refresh_every, "--sweep-every", "1m"])
        for _ in range(self.args.workers):
            self.start_worker()

    @property
    def sentinel(self) -> subprocess.Popen:
        return self.workers[0]

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random worker but the sentinel, with its work-horse; start another."""
        candidates = [p for p in self.workers[1:] if p.poll() is None]
        if not candidates:
            return
        victim = rng.choice(candidates)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        self.workers.remove(victim)
        self.start_worker()

    def check(self) -> None:
        for proc in [self.cron, *self.workers]:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"a process exited ({proc.returncode}); see {self.logdir}")

    def stop(self) -> None:
        procs = [p for p in [*self.workers, self.cron] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for log in self._logs:
            log.close()


# -- what Stora saw ------------------------------------------------------------------------
@dataclass
class Tally:
    """Counts from the sandbox's request log, read and cleared as the run goes."""

    last_seq: int = 0
    unobserved: int = 0
    api_calls: int = 0
    api_401: int = 0
    api_429: int = 0
    token_requests: int = 0
    refresh_requests: int = 0
    token_5xx: int = 0
    faults_queued: int = 0
    held: int = 0
    first_401: list[dict] = field(default_factory=list)

    def read(self, bench: BenchEnv, clear_after: int) -> None:
        entries = bench.requests_since(self.last_seq)
        self.held += len(entries)
        if self.held >= clear_after:
            # The sandbox keeps its log in memory and scans it on every read.
            bench.admin("DELETE", "requests")
            self.held = 0
        for entry in entries:
            if entry["seq"] != self.last_seq + 1:
                self.unobserved += entry["seq"] - self.last_seq - 1
            self.last_seq = entry["seq"]
            path, status = entry["path"], entry["status"]
            if path.startswith(API_PREFIX):
                self.api_calls += 1
                self.api_401 += status == 401
                self.api_429 += status == 429
                if status == 401 and len(self.first_401) < 5:
                    self.first_401.append(entry)
            elif path == TOKEN_PATH:
                self.token_requests += 1
                self.refresh_requests += entry.get("grant_type") == "refresh_token"
                self.token_5xx += status >= 500

    def inject(self, bench: BenchEnv, rate: float, rng: random.Random) -> None:
        """Queue one-shot 5xx faults so that about ``rate`` of refreshes fail."""
        while self.faults_queued < int(self.refresh_requests * rate):
            bench.admin("POST", "faults", json={
                "endpoint": "token", "grant_type": "refresh_token", "count": 1,
                "status": rng.choice(FAULT_STATUSES)})
            self.faults_queued += 1


# -- memory --------------------------------------------------------------------------------
@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    rss: dict[str, list[float]] = field(default_factory=dict)

    def take(self, elapsed: float, procs: dict[str, int]) -> None:
        values = {}
        for name, pid in procs.items():
            try:
                values[name] = psutil.Process(pid).memory_info().rss / (1024 * 1024)
            except psutil.Error:
                return
        self.times.append(elapsed)
        for name, value in values.items():
            self.rss.setdefault(name, []).append(value)

    def slope(self, name: str, after: float) -> tuple[float, float]:
        """(MB per hour, baseline MB) over the samples taken after ``after`` seconds."""
        points = [(t, v) for t, v in zip(self.times, self.rss.get(name, []), strict=False)
                  if t >= after]
        if len(points) < 3:
            return 0.0, points[0][1] if points else 0.0
        n = len(points)
        mean_t = sum(t for t, _ in points) / n
        mean_v = sum(v for _, v in points) / n
        var = sum((t - mean_t) ** 2 for t, _ in points)
        cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
        return (cov / var) * 3600 if var else 0.0, points[0][1]


# -- setup ---------------------------------------------------------------------------------
def seed(bench: BenchEnv, count: int, orders: int) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    def one(index: int) -> dict:
        return bench.sandbox_operator(f"Soak Operator {index:05d}", sites=1, orders=orders,
                                      contacts=1)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def database_state(app) -> dict[str, object]:
    from rq.registry import FailedJobRegistry
    from sqlalchemy import func, select

    from partner_app.connections.models import Operator
    from partner_app.db import db
    from partner_app.incidents import PlatformIncident
    from partner_app.queueing import QUEUES, get_queue
    from partner_app.sync.models import SyncRun, SyncRunItem

    with app.app_context():
        # Items of runs still going: a run held up by one item blocks the next scheduled
        # sync of the same name.
        unfinished = dict(db.session.execute(
            select(SyncRunItem.status, func.count())
            .join(SyncRun, SyncRun.id == SyncRunItem.run_id)
            .where(SyncRun.status == "running").group_by(SyncRunItem.status)).all())
        statuses = dict(db.session.execute(
            select(Operator.status, func.count()).group_by(Operator.status)).all())
        runs = dict(db.session.execute(
            select(SyncRun.status, func.count()).group_by(SyncRun.status)).all())
        incidents = db.session.scalar(select(func.count()).select_from(PlatformIncident))
        failed = sum(FailedJobRegistry(queue=get_queue(name, app)).count for name in QUEUES)
        db.session.remove()
    return {"statuses": statuses, "runs": runs, "incidents": incidents, "failed_jobs": failed,
            "unfinished": unfinished}


# -- the run -------------------------------------------------------------------------------
def soak(args: argparse.Namespace, bench: BenchEnv, app, logdir: Path) -> dict[str, object]:
    rng = random.Random(args.seed)
    fleet = Fleet(bench.env, logdir, args)
    tally = Tally(last_seq=bench.request_seq())
    samples = Samples()
    kills = 0
    fleet.start()
    started = time.monotonic()
    deadline = started + args.duration
    next_kill = started + rng.expovariate(1 / args.kill_every)
    next_sample = started
    next_line = started + 30
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            tally.read(bench, args.clear_after)
            tally.inject(bench, args.token_5xx, rng)
            if now >= next_sample:
                procs = {"sentinel worker": fleet.sentinel.pid, "cron": fleet.cron.pid,
                         "sandbox": bench._sandbox.pid}
                samples.take(now - started, procs)
                next_sample = now + args.sample_every
            if now >= next_kill:
                fleet.kill_one(rng)
                kills += 1
                next_kill = now + rng.expovariate(1 / args.kill_every)
            fleet.check()
            if now >= next_line:
                print(f"[{now - started:6.0f}s] api {tally.api_calls} (401: {tally.api_401}), "
                      f"token {tally.token_requests} (5xx: {tally.token_5xx}), "
                      f"kills {kills}", file=sys.stderr)
                next_line = now + 30
            time.sleep(1.0)
        elapsed = time.monotonic() - started
    finally:
        fleet.stop()
    tally.read(bench, args.clear_after)
    return {"tally": tally, "samples": samples, "kills": kills, "elapsed": elapsed,
            "state": database_state(app)}


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("measure", "value", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), "  ".join("-" * w for w in widths),
                      *(fmt.format(*r) for r in rows)])


def report(args: argparse.Namespace, result: dict, backend: str,
           setup_seconds: float) -> tuple[str, bool]:
    tally: Tally = result["tally"]
    samples: Samples = result["samples"]
    state = result["state"]
    statuses = state["statuses"]
    elapsed = result["elapsed"]
    warmup = min(args.warmup, elapsed / 3)

    def ok(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    needs_reauth = statuses.get("needs_reauth", 0)
    share_401 = tally.api_401 / tally.api_calls if tally.api_calls else 0.0
    rows = [
        ("operators / workers", f"{args.operators} / {args.workers}", "", ""),
        ("duration / access TTL", f"{elapsed:.0f} s / {args.access_ttl} s", "", ""),
        ("backend", backend, "", ""),
        ("setup (not measured)", f"{setup_seconds:.0f} s", "", ""),
        ("API calls", str(tally.api_calls), "", ""),
        ("API calls answered 401", f"{tally.api_401} ({share_401:.4%})", "0",
         ok(tally.api_401 == 0)),
        ("operators needs_reauth", str(needs_reauth), "0", ok(needs_reauth == 0)),
        ("API calls answered 429", str(tally.api_429), "", ""),
        ("token requests / API call",
         f"{tally.token_requests} / {tally.api_calls} = "
         f"{tally.token_requests / max(tally.api_calls, 1):.2f}", "", ""),
        ("token 5xx / refreshes",
         f"{tally.token_5xx} / {tally.refresh_requests} = "
         f"{tally.token_5xx / max(tally.refresh_requests, 1):.2%}",
         f"~{args.token_5xx:.0%}", ""),
        ("worker kills (SIGKILL)", str(result["kills"]), "", ""),
        ("requests unobserved", str(tally.unobserved), "0", ok(tally.unobserved == 0)),
        ("operators by status", ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
         "", ""),
        ("sync runs", ", ".join(f"{k} {v}" for k, v in sorted(state["runs"].items())), "", ""),
        ("items of running runs",
         ", ".join(f"{k} {v}" for k, v in sorted(state["unfinished"].items())) or "-", "", ""),
        ("platform incidents", str(state["incidents"]), "0", ok(state["incidents"] == 0)),
        ("failed RQ jobs", str(state["failed_jobs"]), "", ""),
    ]
    flat = True
    for name in ("sentinel worker", "cron", "sandbox"):
        slope, baseline = samples.slope(name, warmup)
        growth = slope * (elapsed - warmup) / 3600 / baseline if baseline else 0.0
        target = "" if name == "sandbox" else f"<= {GROWTH_TARGET:.0%}"
        verdict = "" if name == "sandbox" else ok(growth <= GROWTH_TARGET)
        if name != "sandbox":
            flat = flat and growth <= GROWTH_TARGET
        rows.append((f"RSS slope, {name}",
                     f"{slope:+.2f} MB/h from {baseline:.0f} MB: {growth:+.2%} over the run",
                     target, verdict))
    good = (tally.api_401 == 0 and needs_reauth == 0 and tally.unobserved == 0
            and state["incidents"] == 0 and flat)
    lines = [_table(rows)]
    if tally.first_401:
        lines.append("first 401s: " + "; ".join(
            f"seq {e['seq']} {e['path']} operator {e.get('operator')}"
            for e in tally.first_401))
    return "\n".join(lines), good


def parse_duration(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    value = value.strip()
    if value[-1:] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=parse_duration, default=30 * 60,
                        help="how long the fleet runs: 90s, 5m, 1h (default 30m)")
    parser.add_argument("--operators", type=int, default=10_000)
    parser.add_argument("--orders", type=int, default=5, help="orders per operator")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--access-ttl", type=int, default=120,
                        help="access-token lifetime at the sandbox, seconds")
    parser.add_argument("--token-5xx", type=float, default=0.01,
                        help="share of refresh requests answered 5xx")
    parser.add_argument("--kill-every", type=float, default=120,
                        help="mean seconds between worker kills")
    parser.add_argument("--orders-every", default="2m", help="cron orders sync interval")
    parser.add_argument("--refresh-every", default="1m", help="cron proactive refresh interval")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds before the RSS baseline (at most a third of the run)")
    parser.add_argument("--clear-after", type=int, default=200_000,
                        help="clear the sandbox's request log once it holds this many")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = parser.parse_args(argv)
    if args.duration < 30 or args.operators < 1 or not 0 <= args.token_5xx < 1:
        parser.error("--duration >= 30s, --operators >= 1, 0 <= --token-5xx < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_folder("bench-soak-", keep=args.keep) as workdir:
        bench = BenchEnv(str(workdir), sandbox_args=[
            "--set", f"access_token_ttl={args.access_ttl}", *STORA_LIMITS])
        if args.sqlite:
            bench.backend = "sqlite"
        with bench:
            app = bench.app()
            setup_started = time.monotonic()
            with app.app_context():
                print(f"seeding {args.operators} operators…", file=sys.stderr)
                created = seed(bench, args.operators, args.orders)
                print("connecting them (authorize + token over HTTP)…", file=sys.stderr)
                connect_operators(app, bench, created)
            setup_seconds = time.monotonic() - setup_started
            print(f"soaking for {args.duration} s…", file=sys.stderr)
            result = soak(args, bench, app, workdir)
            backend = bench.backends
        text, good = report(args, result, backend, setup_seconds)
        print(text)
        return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
