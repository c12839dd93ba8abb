"""T-12 (reliability.md §8): the durable inbox across crashes and outages, with real
processes: ``partner-app web`` (gunicorn), ``partner-app worker`` (burst) and a private
redis-server that these tests may stop (never the machine's shared Redis).

1. The web process is SIGKILLed before the inbox commit (failpoint
   ``webhook_before_commit``): nothing is stored, and Stora's retry is processed once.
2. It dies after the commit, before the enqueue reached Redis: the web process talks to
   a "black hole" Redis (accepts TCP, never answers), so it is provably parked inside the
   after-commit enqueue when it is killed. The sweeper queues the row; processed once.
3. Redis is stopped: the delivery is still acknowledged 200; once Redis is back (empty,
   as after a restart without persistence) the sweeper queues it; processed once.
4. The database is unreachable: 503, nothing stored, and Stora's retry after it returns
   is stored and processed once. On PostgreSQL the web process reaches the database
   through a TCP proxy this test cuts (open connections reset, new ones refused) and
   restores, so one web process sees the outage and the recovery. On SQLite there is
   no server to stop (and root ignores file modes), so another process holds the write
   lock past the app's busy timeout, which is how a SQLite store "cannot take writes".

The sweeper runs in this process with the clock moved past its 60 s threshold, as
the minute cron would run it, rather than waiting a minute.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import time_machine
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from partner_app import create_app, embedded_redis
from partner_app.db import db
from partner_app.queueing import QUEUE_WEBHOOKS, get_queue
from partner_app.settings import Settings
from partner_app.sync.models import SyncedOrder
from partner_app.timeline.models import TimelineEvent
from partner_app.webhooks import jobs
from partner_app.webhooks.models import WebhookEvent
from tests.conftest import BACKEND, ROOT, _truncate_all, free_port, settings_env
from tests.e2e.conftest import wait_until
from tests.integration.test_webhook_receiver import (
    Hook,
    encode,
    envelope,
    make_hook,
    signed_headers,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

SWEEP_DELAY = jobs.SWEEP_AFTER + timedelta(seconds=1)


# -- processes -----------------------------------------------------------------------------
@dataclass
class Web:
    proc: subprocess.Popen
    base: str
    log: Path

    def post(self, hook: Hook, body: bytes, headers: dict[str, str],
             timeout: float = 30) -> requests.Response:
        return requests.post(f"{self.base}{hook.path}", data=body, headers=headers,
                             timeout=timeout)


@dataclass
class World:
    """The run's database, a private Redis, and the processes one test starts."""

    app: object  # this process's app: same database, the private Redis
    env: dict[str, str]
    redis_dir: str
    tmp: Path
    hook: Hook
    procs: list[subprocess.Popen] = field(default_factory=list)

    # processes ---------------------------------------------------------------------------
    def start_web(self, **overrides: str) -> Web:
        """``partner-app web`` in its own process group (so a kill takes every worker)."""
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = self.tmp / f"web-{len(self.procs)}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "partner_app.cli", "web", "--port", str(port),
                 "--workers", "1"], env={**self.env, **overrides}, cwd=ROOT, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        wait_until(lambda: _answers(f"{base}/healthz", proc, log), 30, f"web on {base}")
        return Web(proc, base, log)

    def kill(self, web: Web, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(web.proc.pid, sig)
        web.proc.wait(15)

    def drain(self) -> None:
        """A real ``partner-app worker webhooks --burst`` until the queue is empty."""
        log = self.tmp / f"worker-{len(self.procs)}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "partner_app.cli", "worker", QUEUE_WEBHOOKS, "--burst",
                 "--no-scheduler", "--name", f"crash-{os.getpid()}-{len(self.procs)}"],
                env=self.env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        assert proc.wait(60) == 0, log.read_text()[-2000:]

    def sweep_later(self) -> dict:
        """The minute cron's ``sweep_inbox``, run once the pending rows are old enough."""
        with self.app.app_context(), time_machine.travel(datetime.now(UTC) + SWEEP_DELAY):
            return jobs.sweep_inbox()

    # state -------------------------------------------------------------------------------
    def rows(self) -> list[WebhookEvent]:
        with self.app.app_context():
            rows = list(db.session.scalars(select(WebhookEvent).where(
                WebhookEvent.operator_id == self.hook.operator_id).order_by(WebhookEvent.id)))
            db.session.expunge_all()
            return rows

    def effects(self) -> tuple[int, int]:
        """(synced_orders rows, timeline_events rows) of the operator."""
        with self.app.app_context():
            return tuple(db.session.scalar(select(func.count()).select_from(model).where(
                model.operator_id == self.hook.operator_id))
                for model in (SyncedOrder, TimelineEvent))

    def queued(self) -> int:
        with self.app.app_context():
            return get_queue(QUEUE_WEBHOOKS, self.app).count

    def stop_redis(self) -> None:
        embedded_redis.stop(self.redis_dir)

    def start_redis(self) -> None:
        embedded_redis.ensure_running(self.redis_dir)


def _kill_process(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started; a web process with its whole group (it leads one)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    proc.wait(15)


def _answers(url: str, proc: subprocess.Popen, log: Path) -> bool:
    assert proc.poll() is None, f"{url}: exited; see {log}"
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


@pytest.fixture
def world(app, backend_urls, sandbox, tmp_path) -> Iterator[World]:
    _truncate_all(app)
    redis_dir = str(tmp_path)  # embedded_redis keeps its socket under <dir>/redis
    redis_url = embedded_redis.ensure_running(redis_dir)
    env = {**os.environ, **settings_env({**backend_urls, "redis_url": redis_url},
                                        sandbox_url=sandbox.base_url)}
    env.pop("PARTNER_FAILPOINTS", None)
    ours = create_app(Settings.from_env(env))
    w = World(app=ours, env=env, redis_dir=redis_dir, tmp=tmp_path, hook=make_hook(ours))
    try:
        yield w
    finally:
        for proc in w.procs:
            if proc.poll() is None:
                _kill_process(proc)
        with ours.app_context():
            db.engine.dispose()
        embedded_redis.stop(redis_dir)
        _truncate_all(app)


def delivery(hook: Hook) -> tuple[dict, bytes, dict[str, str]]:
    document = envelope()
    body = encode(document)
    return document, body, signed_headers(body, hook.secret)


def assert_processed_once(world: World, event_id: str, *, deliveries: int) -> None:
    [row] = world.rows()
    assert (row.event_id, row.status, row.attempts, row.deliveries, row.last_error) == (
        event_id, "processed", 1, deliveries, None)
    assert world.effects() == (1, 1)


# -- 1. killed before the commit -----------------------------------------------------------
def test_killed_before_the_commit_stores_nothing_and_the_retry_is_processed_once(world):
    document, body, headers = delivery(world.hook)
    armed = world.start_web(PARTNER_FAILPOINTS="webhook_before_commit=kill")

    with pytest.raises(requests.ConnectionError):
        armed.post(world.hook, body, headers)

    assert world.rows() == []
    assert world.queued() == 0
    world.kill(armed, signal.SIGTERM)

    # Stora saw no 2xx and retries (a minute later: inside the signature tolerance).
    web = world.start_web()
    retry = web.post(world.hook, body, headers)
    assert (retry.status_code, retry.json()["duplicate"]) == (200, False)
    world.drain()
    assert_processed_once(world, document["event"]["id"], deliveries=1)
    assert world.sweep_later()["stale"] == 0


# -- 2. killed after the commit, before the enqueue ----------------------------------------
@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A TCP port that completes handshakes (the kernel's backlog) but never reads or
    answers: a Redis client connecting there blocks until its socket timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def test_killed_after_the_commit_before_the_enqueue_the_sweeper_processes_it_once(world):
    document, body, headers = delivery(world.hook)
    with black_hole() as unreachable:
        web = world.start_web(REDIS_URL=unreachable)
        answer: list[object] = []
        sender = threading.Thread(target=lambda: answer.append(_post_or_error(
            web, world.hook, body, headers)))
        sender.start()
        # The row is committed, yet no answer came: the process is inside the enqueue.
        wait_until(lambda: world.rows(), 15, "the inbox commit")
        assert sender.is_alive() and answer == []
        world.kill(web)
        sender.join(10)
    assert isinstance(answer[0], requests.ConnectionError)
    [row] = world.rows()
    assert row.status == "pending"
    assert world.queued() == 0

    # Stora retries (it saw no 2xx): a duplicate, acknowledged, and not queued again.
    web = world.start_web()
    retry = web.post(world.hook, body, headers)
    assert (retry.status_code, retry.json()["duplicate"]) == (200, True)
    assert world.queued() == 0

    assert world.sweep_later() == {"stale": 1, "queued": 1}
    world.drain()
    assert_processed_once(world, document["event"]["id"], deliveries=2)
    assert world.sweep_later()["stale"] == 0


def _post_or_error(web: Web, hook: Hook, body: bytes, headers: dict[str, str]) -> object:
    try:
        return web.post(hook, body, headers)
    except requests.RequestException as exc:
        return exc


# -- 3. Redis stopped ----------------------------------------------------------------------
def test_with_redis_stopped_the_delivery_is_acknowledged_and_processed_after_it_returns(world):
    web = world.start_web()
    # A first delivery while Redis is up, so the web process holds live connections.
    _, body, headers = delivery(world.hook)
    assert web.post(world.hook, body, headers).status_code == 200
    world.drain()

    world.stop_redis()
    document, body, headers = delivery(world.hook)
    started = time.monotonic()
    resp = web.post(world.hook, body, headers)
    acknowledged_in = time.monotonic() - started
    assert (resp.status_code, resp.json()["duplicate"]) == (200, False)
    assert acknowledged_in < 5, f"acknowledged in {acknowledged_in:.2f}s"
    assert "job.enqueue_failed" in web.log.read_text()

    world.start_redis()  # back, and empty: it persisted nothing
    assert world.queued() == 0
    assert world.sweep_later() == {"stale": 1, "queued": 1}
    world.drain()
    rows = {row.event_id: row for row in world.rows()}
    assert (rows[document["event"]["id"]].status, rows[document["event"]["id"]].attempts) == (
        "processed", 1)

    # The same web process enqueues directly again now that Redis answers.
    _, body, headers = delivery(world.hook)
    assert web.post(world.hook, body, headers).status_code == 200
    assert world.queued() == 1
    world.drain()
    assert [(row.status, row.attempts) for row in world.rows()] == [("processed", 1)] * 3
    assert world.effects() == (3, 3)


# -- 4. the database down ------------------------------------------------------------------
class TcpProxy:
    """A loopback TCP forwarder that can be cut (connections reset, new ones refused)
    and restored on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave
            # the kernel socket listening until that call returns.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def database_outage(world: World) -> Iterator[tuple[dict[str, str], Callable, Callable]]:
    """(web env overrides, take the database away, bring it back)."""
    url = make_url(world.env["DATABASE_URL"])
    if BACKEND == "services":
        proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
        proxy.restore()
        try:
            yield ({"DATABASE_URL": url.set(port=proxy.port).render_as_string(
                hide_password=False)}, proxy.cut, proxy.restore)
        finally:
            proxy.cut()
        return
    holder: list[sqlite3.Connection] = []

    def take() -> None:
        conn = sqlite3.connect(url.database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # the write lock, held until give_back
        holder.append(conn)

    def give_back() -> None:
        holder.pop().rollback()

    try:
        yield {}, take, give_back
    finally:
        for conn in holder:
            conn.close()


def test_with_the_database_down_the_answer_is_503_and_the_retry_is_processed_once(world):
    with database_outage(world) as (overrides, take_down, bring_back):
        web = world.start_web(**overrides)
        warm, body, headers = delivery(world.hook)
        assert web.post(world.hook, body, headers).status_code == 200

        take_down()
        document, body, headers = delivery(world.hook)
        started = time.monotonic()
        resp = web.post(world.hook, body, headers)
        answered_in = time.monotonic() - started
        assert (resp.status_code, resp.json()) == (503, {"error": "unavailable"})
        assert answered_in < 20, f"answered in {answered_in:.2f}s"
        bring_back()

        assert [row.event_id for row in world.rows()] == [warm["event"]["id"]]
        retry = web.post(world.hook, body, headers)  # Stora's retry, same process
        assert (retry.status_code, retry.json()["duplicate"]) == (200, False)
    world.drain()
    rows = {row.event_id: row for row in world.rows()}
    assert (rows[document["event"]["id"]].status, rows[document["event"]["id"]].attempts,
            rows[document["event"]["id"]].deliveries) == ("processed", 1, 1)
    assert world.effects() == (2, 2)
