"""Webhook receipt benchmark: signed ``order.created`` deliveries against the real app.

    python -m bench.webhooks [--connections 16] [--seconds 15] [--workers 2] [--rate N]
                             [--generator wrk|python] [--sqlite] [--keep]

Two servers run with the very same command line, ``partner-app web`` (gunicorn, gthread,
2 workers x 4 threads, access log on): the platform, and a bare Flask app that reads the
body and answers 200 (``partner-app web`` started from a folder whose ``wsgi.py`` is
that bare app). Deliveries are signed like Stora's, 10% of them exact copies of an
earlier delivery (Stora's retries). Saturated phases are driven by wrk replaying
requests signed just before the phase (``bench/webhooks_wrk.lua``); the paced phase by
Python threads, one keep-alive ``http.client`` connection each. Phases:

1. bare endpoint, saturated (closed loop, ``--connections``);
2. the platform, saturated, no workers: **accepted deliveries/s** and the ratio to
   phase 1 (target >= 0.5); then saturated again while ``--workers`` real
   ``partner-app worker webhooks`` processes drain the inbox;
3. the platform at a fixed rate (``--rate``, default half of the draining rate), workers
   still draining: **p99 acknowledgement latency** (target <= 50 ms), measured from
   each request's scheduled start so queueing delay is not hidden;
4. the workers finish the backlog (at most ``--drain-seconds``): **drain rate**, events
   processed per second, during the load phases and after them.

Backends come from ``bench/harness.py`` (PostgreSQL and the machine's Redis db 12,
flushed, when they answer; else SQLite and the embedded Redis; ``--sqlite`` forces
SQLite). Everything it creates is removed on exit. No secret is printed.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import psutil

from bench.harness import ROOT, BenchEnv, _free_port, named_cpu, tree_cpu, work_folder
from partner_app.stora.signatures import HEADER, sign

EXAMPLE = ROOT / "tests" / "data" / "order-created-webhook.raw.json"
DUPLICATE_RATIO = 0.10
TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0


# -- the bare endpoint -------------------------------------------------------------------
def create_bare_app():
    """The floor: Flask on the same gunicorn, reading the body and answering 200."""
    from flask import Flask, jsonify, request

    app = Flask("bare")

    @app.post("/webhooks/stora/<route_key>")
    def receive(route_key: str):
        request.get_data(cache=False)
        return jsonify(received=True, duplicate=False), 200

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    return app


def bare_site(workdir: Path) -> Path:
    """A folder whose ``wsgi.py`` is the bare app, so ``partner-app web`` serves it."""
    site = workdir / "bare"
    site.mkdir()
    (site / "wsgi.py").write_text("from bench.webhooks import create_bare_app\n\n"
                                  "app = create_bare_app()\n")
    return site


# -- deliveries --------------------------------------------------------------------------
class Deliveries:
    """Thread-safe stream of (body, headers, duplicate?) signed for one endpoint.

    New events are Stora's documented example with fresh event and order ids; a
    duplicate is the exact bytes and header of one of the recent deliveries.
    """

    def __init__(self, secret: str, *, duplicate_ratio: float = DUPLICATE_RATIO,
                 seed: int = 7):
        document = json.loads(EXAMPLE.read_bytes())
        document["event"]["id"] = "@EVENT@"
        document["event"]["data"]["order"]["id"] = "@ORDER@"
        self._template = json.dumps(document, separators=(",", ":"),
                                    ensure_ascii=False).encode()
        self._secret = secret
        self._ratio = duplicate_ratio
        self._random = random.Random(seed)
        self._recent: deque[tuple[bytes, dict[str, str]]] = deque(maxlen=200)
        self._lock = threading.Lock()

    def next(self) -> tuple[bytes, dict[str, str], bool]:
        with self._lock:
            if self._recent and self._random.random() < self._ratio:
                body, headers = self._random.choice(self._recent)
                return body, headers, True
        token = uuid.uuid4().hex[:16]
        body = (self._template.replace(b"@EVENT@", f"evt_{token}".encode())
                .replace(b"@ORDER@", f"order_{token}".encode()))
        headers = {"Content-Type": "application/json", "User-Agent": "Stora-Webhooks/1.0",
                   HEADER: sign(body, self._secret, int(time.time()))}
        with self._lock:
            self._recent.append((body, headers))
        return body, headers, False


def create_subscription(app) -> tuple[str, str]:
    """An active operator and subscription (secret stored as the reconciler stores it);
    returns (route path, secret)."""
    from partner_app.connections.credentials import cipher_for_key, live_data_key
    from partner_app.connections.models import Operator
    from partner_app.db import db
    from partner_app.webhooks.inbox import SECRET_COLUMN, SECRET_TABLE
    from partner_app.webhooks.models import WebhookSubscription, new_route_key

    vault = app.extensions["vault"]
    secret, route_key = secrets.token_hex(32), new_route_key()
    with app.app_context():
        operator = Operator(name="Bench Webhooks Storage", status="active",
                            stora_identity="name:Bench Webhooks Storage",
                            connected_at=datetime.now(UTC))
        db.session.add(operator)
        db.session.flush()
        key = live_data_key(operator, vault=vault)
        db.session.add(WebhookSubscription(
            operator_id=operator.id, route_key=route_key, status="active",
            url=f"https://hooks.partner.test/webhooks/stora/{route_key}",
            event_types=["order.created"], stora_endpoint_id="we_bench", data_key_id=key.id,
            secret_ct=cipher_for_key(key, vault=vault).encrypt(SECRET_TABLE, SECRET_COLUMN,
                                                               secret)))
        db.session.commit()
    return f"/webhooks/stora/{route_key}", secret


# -- processes ---------------------------------------------------------------------------
def _wait_http(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited")
        with suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            conn.close()
            return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} never answered")


@contextmanager
def processes(commands: list[tuple[list[str], Path, Path]],
              env: dict[str, str]) -> Iterator[list[subprocess.Popen]]:
    """Start (argv, cwd, log) each; SIGTERM and reap them all on exit."""
    procs, logs = [], []
    try:
        for argv, cwd, log_path in commands:
            log = open(log_path, "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT))
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def web_command(port: int, cwd: Path, log: Path) -> tuple[list[str], Path, Path]:
    return ([sys.executable, "-m", "partner_app.cli", "web", "--port", str(port)], cwd, log)


def worker_commands(count: int, logdir: Path, *,
                    nice: int = 0) -> list[tuple[list[str], Path, Path]]:
    """``count`` webhook workers, at CPU priority ``nice`` (as ``nice -n``)."""
    prefix = ["nice", "-n", str(nice)] if nice else []
    return [([*prefix, sys.executable, "-m", "partner_app.cli", "worker", "webhooks",
              "--name", f"bench-webhooks-{os.getpid()}-{index}"], ROOT,
             logdir / f"worker-{index}.log") for index in range(count)]


# -- load --------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    elapsed: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    new_accepted: int = 0  # 200s for deliveries that were not duplicates
    cpu: dict[str, float] = field(default_factory=dict)  # cores used, per component
    lock: threading.Lock = field(default_factory=threading.Lock)
    # wrk reports percentiles, not samples, and cannot tell which request an answer
    # belongs to: requests still in flight when it stops may or may not have been
    # stored, so the inbox check allows them (``in_flight``).
    reported: dict[float, float] = field(default_factory=dict)
    in_flight: int = 0
    issued: int = 0
    new_issued: int = 0

    def record(self, status: int, latency_ms: float, duplicate: bool) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status == 200:
                self.latencies_ms.append(latency_ms)
                self.new_accepted += not duplicate

    @property
    def accepted(self) -> int:
        return self.statuses[200]

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        if p in self.reported:
            return self.reported[p]
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Client:
    """One keep-alive connection; reconnects after an error (counted as status 0)."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return 0


def run_load(phase: Phase, port: int, path: str, deliveries: Deliveries, *,
             connections: int, seconds: float, rate: float | None = None,
             meter: CpuMeter | None = None) -> Phase:
    """Closed loop (``rate`` None: each connection sends as fast as answers come) or
    open loop at ``rate`` per second, latency counted from the scheduled start."""
    cpu_before = meter.sample() if meter else {}
    started = time.monotonic()
    deadline = started + seconds
    ticket = itertools.count()

    def loop() -> None:
        client = Client(port)
        while True:
            if rate is None:
                scheduled = time.monotonic()
                if scheduled >= deadline:
                    break
            else:
                scheduled = started + next(ticket) / rate
                if scheduled >= deadline:
                    break
                time.sleep(max(0.0, scheduled - time.monotonic()))
            body, headers, duplicate = deliveries.next()
            status = client.post(path, body, headers)
            phase.record(status, (time.monotonic() - scheduled) * 1000, duplicate)
        if client.conn is not None:
            client.conn.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    phase.elapsed = time.monotonic() - started
    if meter:
        phase.cpu = CpuMeter.cores(cpu_before, meter.sample(), phase.elapsed)
    return phase


WRK_SCRIPT = ROOT / "bench" / "webhooks_wrk.lua"


def write_requests(file: Path, path: str, deliveries: Deliveries, count: int) -> list[bool]:
    """Sign ``count`` deliveries now (the phase starts right after, well inside the
    tolerance) and write them as raw HTTP requests for the wrk script; returns which
    of them are duplicates, in order."""
    duplicates = []
    with open(file, "wb") as out:
        for _ in range(count):
            body, headers, duplicate = deliveries.next()
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            raw = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            out.write(f"{len(raw)}\n".encode() + raw)
            duplicates.append(duplicate)
    return duplicates


def run_wrk(phase: Phase, port: int, path: str, deliveries: Deliveries, *,
            connections: int, seconds: float, requests: int, threads: int, workdir: Path,
            meter: CpuMeter | None = None) -> Phase:
    """Closed loop through wrk (C, epoll): ``connections`` keep-alive connections send
    pre-signed deliveries as fast as answers come."""
    file = workdir / "requests.bin"
    duplicates = write_requests(file, path, deliveries, requests)
    cpu_before = meter.sample() if meter else {}
    started = time.monotonic()
    result = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:.0f}s",
         "--timeout", "30s", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}/"],
        env={**os.environ, "WEBHOOK_REQUESTS": str(file), "WEBHOOK_THREADS": str(threads)},
        capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - started
    if meter:
        phase.cpu = CpuMeter.cores(cpu_before, meter.sample(), elapsed)
    file.unlink()
    line = next(li for li in result.stdout.splitlines() if li.startswith("WRK_RESULT "))
    data = json.loads(line.split(" ", 1)[1])
    phase.elapsed = data["duration_us"] / 1e6
    phase.statuses.update({int(k): v for k, v in data["statuses"].items()})
    if data["errors"]:
        phase.statuses[0] += data["errors"]
    phase.reported = {50: data["p50_us"] / 1000, 99: data["p99_us"] / 1000}
    phase.issued = data["issued"]
    phase.in_flight = max(0, data["issued"] - data["completed"])
    # Requests i go to thread i mod threads, each thread in order: what was issued.
    sent = [0] * threads
    for index in range(threads):
        share = len(range(index, len(duplicates), threads))
        issued_here = data["issued"] // threads + (index < data["issued"] % threads)
        sent[index] = min(share, issued_here)
    phase.new_issued = sum(1 for i, dup in enumerate(duplicates)
                           if not dup and i // threads < sent[i % threads])
    phase.new_accepted = phase.new_issued  # bounded below by new_issued - in_flight
    if data["wrapped"]:
        phase.name += " (list wrapped: repeats)"
    return phase


# -- drain -------------------------------------------------------------------------------
class DrainWatch:
    """Samples (time, processed events) from the database twice a second."""

    def __init__(self, app):
        self.app = app
        self.samples: list[tuple[float, int, int]] = []  # (t, processed, stored)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DrainWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def counts(self) -> tuple[int, int]:
        from sqlalchemy import func, select

        from partner_app.db import db
        from partner_app.webhooks.models import WebhookEvent

        with self.app.app_context():
            processed = db.session.scalar(select(func.count()).select_from(WebhookEvent)
                                          .where(WebhookEvent.status == "processed"))
            stored = db.session.scalar(select(func.count()).select_from(WebhookEvent))
            return processed, stored

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), *self.counts()))
            self._stop.wait(0.5)

    def rate_between(self, start: float, end: float) -> float:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def drain_after_load(watch: DrainWatch, budget: float) -> tuple[float, int]:
    """Wait until every stored event is processed (at most ``budget`` seconds); return
    the processing rate over that wait and the backlog left."""
    started = time.monotonic()
    first, stored = watch.counts()
    processed = first
    while processed < stored and time.monotonic() - started < budget:
        time.sleep(0.25)
        processed, stored = watch.counts()
    elapsed = time.monotonic() - started
    return ((processed - first) / elapsed if elapsed > 0.25 else float("nan"),
            stored - processed)


def inbox_totals(app) -> dict[str, int]:
    from sqlalchemy import func, select

    from partner_app.db import db
    from partner_app.webhooks.models import WebhookEvent

    with app.app_context():
        rows = db.session.execute(select(WebhookEvent.status, func.count(),
                                         func.sum(WebhookEvent.deliveries),
                                         func.sum(WebhookEvent.attempts))
                                  .group_by(WebhookEvent.status)).all()
    totals = {"rows": 0, "deliveries": 0, "attempts": 0}
    for status, rows_, deliveries, attempts in rows:
        totals[status] = rows_
        totals["rows"] += rows_
        totals["deliveries"] += deliveries or 0
        totals["attempts"] += attempts or 0
    return totals


# -- where the CPU goes -----------------------------------------------------------------
class CpuMeter:
    """Cores used per component between two ``sample`` calls."""

    def __init__(self):
        self.pids: dict[str, list[int]] = {}

    def sample(self) -> dict[str, float]:
        values = {group: sum(tree_cpu(pid) for pid in pids)
                  for group, pids in self.pids.items()}
        values["postgres"] = named_cpu("postgres")
        values["redis"] = named_cpu("redis-server")
        # This process only: the servers and workers are its children, counted above.
        own = psutil.Process().cpu_times()
        values["load generator"] = own.user + own.system
        return values

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float],
              seconds: float) -> dict[str, float]:
        return {group: (after[group] - before.get(group, 0.0)) / seconds
                for group in after if seconds > 0}


# -- report ------------------------------------------------------------------------------
def _line(phase: Phase) -> str:
    others = {k: v for k, v in phase.statuses.items() if k != 200}
    cpu = ", ".join(f"{group} {cores:.2f}" for group, cores in phase.cpu.items()
                    if cores >= 0.01)
    return (f"  {phase.name:<32} {phase.rate:7.0f}/s  p50 {phase.percentile(50):6.1f} ms  "
            f"p99 {phase.percentile(99):7.1f} ms"
            + (f"  other answers {dict(others)}" if others else "")
            + f"\n  {'':<32} cores used: {cpu}")


@dataclass
class Results:
    bare: Phase
    alone: Phase
    draining: Phase
    paced: Phase
    drain_during: float
    drain_after: float
    backlog: int
    totals: dict[str, int]

    def consistent(self) -> bool:
        """Every acknowledged new event stored once; every acknowledged delivery counted
        (give or take the requests wrk left in flight when it stopped)."""
        phases = (self.alone, self.draining, self.paced)
        slack = sum(p.in_flight for p in phases)
        rows, deliveries = self.totals["rows"], self.totals["deliveries"]
        accepted = sum(p.accepted for p in phases)
        new = sum(p.new_accepted for p in phases)
        return (new - slack <= rows <= new and accepted <= deliveries <= accepted + slack
                and self.totals.get("failed", 0) == 0)


def _cpu_ms(phase: Phase, group: str) -> float:
    """Milliseconds of ``group``'s CPU per accepted delivery."""
    return (phase.cpu.get(group, 0.0) * phase.elapsed * 1000 / phase.accepted
            if phase.accepted else float("nan"))


def report(args, backend: str, r: Results) -> tuple[str, bool]:
    ratio = r.alone.rate / r.bare.rate if r.bare.rate else 0.0
    bare_ms, web_ms = _cpu_ms(r.bare, "bare web"), _cpu_ms(r.alone, "web")
    # Everything a delivery costs the machine: the receiver, the database, Redis.
    bare_all = sum(_cpu_ms(r.bare, group) for group in ("bare web", "postgres", "redis"))
    app_all = sum(_cpu_ms(r.alone, group) for group in ("web", "postgres", "redis"))
    ratio_draining = r.draining.rate / r.bare.rate if r.bare.rate else 0.0
    p99 = r.paced.percentile(99)
    verdict = {True: "PASS", False: "FAIL"}
    lines = [
        f"webhook receipt on {backend}; {os.cpu_count()} cores; partner-app web (gunicorn "
        f"{os.environ.get('WEB_WORKERS', '2')} x {os.environ.get('WEB_THREADS', '4')} "
        f"gthread); {args.connections} keep-alive connections; {args.workers} RQ "
        f"workers{f' at nice {args.worker_nice}' if args.worker_nice else ''}; "
        f"{DUPLICATE_RATIO:.0%} duplicates; {args.seconds:.0f} s per phase; "
        f"saturated phases by {args.generator}, paced phase by Python threads; "
        f"load average {args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        *(_line(phase) for phase in (r.bare, r.alone, r.draining, r.paced)),
        f"  accepted/s vs bare endpoint        {ratio:.2f} (workers idle), "
        f"{ratio_draining:.2f} (workers draining)   target >= {TARGET_RATIO}: "
        f"{verdict[ratio >= TARGET_RATIO]}",
        # On a shared machine the rates follow the CPU share each server gets; its CPU
        # per delivery does not, so it says what the ratio would be on idle cores.
        f"  web CPU per accepted delivery      bare {bare_ms:.2f} ms, platform "
        f"{web_ms:.2f} ms: ratio {bare_ms / web_ms:.2f} (information)",
        f"  CPU per delivery, whole machine    bare {bare_all:.2f} ms, platform "
        f"{app_all:.2f} ms (web + postgres + redis): ceiling ratio {bare_all / app_all:.2f}"
        " on cores that do nothing else",
        f"  p99 ack latency at {r.paced.rate:.0f}/s, draining  {p99:.1f} ms   target <= "
        f"{TARGET_P99_MS:.0f} ms: {verdict[p99 <= TARGET_P99_MS]}",
        f"  drain rate during load             {r.drain_during:.1f} events/s",
        f"  drain rate after load              {r.drain_after:.1f} events/s"
        + (f"  (backlog left after {args.drain_seconds:.0f} s: {r.backlog})"
           if r.backlog else ""),
        f"  inbox: {r.totals['rows']} events, {r.totals['deliveries']} deliveries, "
        f"{r.totals.get('processed', 0)} processed, {r.totals.get('failed', 0)} failed, "
        f"{r.totals['attempts']} processing attempts: "
        + ("consistent with the acknowledgements" if r.consistent() else "INCONSISTENT"),
    ]
    good = ratio >= TARGET_RATIO and p99 <= TARGET_P99_MS and r.consistent()
    return "\n".join(lines), good


# -- main --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15, help="per load phase")
    parser.add_argument("--rate", type=float, default=None,
                        help="paced phase rate (default: half the draining saturated rate)")
    parser.add_argument("--workers", type=int, default=2, help="RQ worker processes")
    parser.add_argument("--worker-nice", type=int, default=0,
                        help="run the workers at this CPU priority (nice -n), as on a "
                             "web machine that also drains")
    parser.add_argument("--drain-seconds", type=float, default=40)
    parser.add_argument("--generator", choices=("wrk", "python"),
                        default="wrk" if shutil.which("wrk") else "python",
                        help="saturated phases: wrk (default when installed) or the "
                             "Python threads; the paced phase always uses the Python one")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return parser.parse_args(argv)


def measure(args, bench: BenchEnv, workdir: Path) -> Results:
    app = bench.app()
    path, secret = create_subscription(app)
    deliveries = Deliveries(secret)  # the platform's phases share one duplicate memory
    env = {**os.environ, **bench.env}
    env.pop("PARTNER_FAILPOINTS", None)
    bare_port, app_port = _free_port(), _free_port()
    servers = [web_command(bare_port, bare_site(workdir), workdir / "bare.log"),
               web_command(app_port, ROOT, workdir / "web.log")]
    meter = CpuMeter()
    paced_load = partial(run_load, connections=args.connections, seconds=args.seconds,
                         meter=meter)
    if args.generator == "wrk":
        def saturate(phase: Phase, port: int, stream: Deliveries, requests: int) -> Phase:
            # A list of its own: wrk sends only part of it, and later duplicates must
            # copy deliveries that were sent.
            return run_wrk(phase, port, path, Deliveries(secret, seed=requests),
                           connections=args.connections, seconds=args.seconds,
                           requests=requests, threads=args.wrk_threads, workdir=workdir,
                           meter=meter)
    else:
        def saturate(phase: Phase, port: int, stream: Deliveries, requests: int) -> Phase:
            return paced_load(phase, port, path, stream)
    # The bare server imports bench.webhooks from its own folder.
    with processes(servers, {**env, "PYTHONPATH": str(ROOT)}) as (bare_proc, app_proc):
        _wait_http(bare_port, bare_proc)
        _wait_http(app_port, app_proc)
        meter.pids["bare web"] = [bare_proc.pid]
        meter.pids["web"] = [app_proc.pid]
        print("bare endpoint…", file=sys.stderr)
        # The bare endpoint ignores content: a short list, repeated, is enough.
        bare = saturate(Phase("bare endpoint, saturated"), bare_port, Deliveries(secret),
                        5000)
        # Enough signed deliveries that the platform (no faster than the floor) never
        # runs out of fresh ones.
        enough = min(120_000, int(bare.rate * args.seconds * 1.1) + 1000)
        print("platform, saturated, no workers…", file=sys.stderr)
        alone = saturate(Phase("platform, saturated"), app_port, deliveries, enough)
        with DrainWatch(app) as watch, \
                processes(worker_commands(args.workers, workdir, nice=args.worker_nice),
                          env) as workers:
            meter.pids["workers"] = [proc.pid for proc in workers]
            load_started = time.monotonic()
            print("platform, saturated, workers draining…", file=sys.stderr)
            draining = saturate(Phase("platform, saturated, draining"), app_port,
                                deliveries, enough)
            rate = args.rate or max(1.0, draining.rate / 2)
            print(f"platform at {rate:.0f}/s, workers draining…", file=sys.stderr)
            paced = paced_load(Phase("platform, paced, draining"), app_port, path,
                               deliveries, rate=rate)
            load_ended = time.monotonic()
            print("workers draining the rest…", file=sys.stderr)
            drain_after, backlog = drain_after_load(watch, args.drain_seconds)
        totals = inbox_totals(app)
    return Results(bare, alone, draining, paced,
                   drain_during=watch.rate_between(load_started, load_ended),
                   drain_after=drain_after, backlog=backlog, totals=totals)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    with work_folder("bench-webhooks-", keep=args.keep) as workdir:
        bench = BenchEnv(str(workdir))
        if args.sqlite:
            bench.backend = "sqlite"
        with bench:
            results = measure(args, bench, workdir)
            backend = bench.backends
        text, good = report(args, backend, results)
        print(text)
        return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
