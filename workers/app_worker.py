"""RQ workers that run every job inside a fresh Flask application context."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import random
import signal
import time

from flask import Flask
from rq import Worker
from rq.serializers import JSONSerializer
from rq.worker.base import logger as rq_worker_logger

from partner_app import metrics
from partner_app.logging import job_context


class AppWorker(Worker):
    """Forks a work-horse per job (so a crash or kill -9 costs one job, not the worker)
    and gives each job its own app context, hence its own database session."""

    app: Flask

    def __init__(self, *args, app: Flask, **kwargs):
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)
        self.app = app

    @property
    def dequeue_timeout(self) -> int:
        # RQ runs maintenance between dequeues, and an idle worker blocks in one for
        # worker_ttl - 15 s (405 s): wake at least once per maintenance interval, or a
        # quiet worker never takes over a dead one's jobs and scheduler.
        return max(1, min(self.worker_ttl - 15, int(self.maintenance_interval)))

    def perform_job(self, job, queue, execution) -> bool:
        metrics.adopt_work_horse_identity()
        with self.app.app_context(), job_context(job.id):
            try:
                return super().perform_job(job, queue, execution)
            finally:
                from partner_app.db import db

                db.session.remove()

    # Job outcomes for /metrics; the horse reports its own, the worker reports a killed horse.
    def handle_job_success(self, job, queue, *args, **kwargs):
        metrics.job_done(job.origin, "finished")
        return super().handle_job_success(job, queue, *args, **kwargs)

    def handle_job_retry(self, job, queue, retry, *args, **kwargs):
        metrics.job_done(job.origin, "failed" if (job.number_of_retries or 0) >= retry.max
                         else "retried")
        return super().handle_job_retry(job, queue, retry, *args, **kwargs)

    def handle_job_failure(self, job, queue, *args, **kwargs):
        metrics.job_done(job.origin, "stopped" if self._stopped_job_id == job.id
                         else "retried" if job.should_retry else "failed")
        return super().handle_job_failure(job, queue, *args, **kwargs)


# Imported once in the worker so every forked work-horse starts warm instead of
# importing and compiling them again for each job.
JOB_MODULES = (
    "partner_app.connections.jobs",
    "partner_app.sync.jobs",
    "partner_app.timeline.jobs",
    "partner_app.webhooks.jobs",
    "partner_app.webhooks.reconcile_jobs",
)


def prepare_for_fork(app: Flask) -> None:
    """Warm the parent, then make forking cheap and safe.

    No pooled database connection may cross a fork (SQLAlchemy pooling docs); job
    modules and mapper configuration are done once here, and ``gc.freeze()`` keeps the
    warm objects out of the children's collections, so copy-on-write pages stay shared.
    """
    from sqlalchemy.orm import configure_mappers

    from partner_app.db import db

    for name in JOB_MODULES:
        importlib.import_module(name)
    configure_mappers()
    with app.app_context():
        engine = db.engine
        engine.dispose()
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    gc.collect()
    gc.freeze()


class ReusedHorseWorker(AppWorker):
    """An ``AppWorker`` whose work-horse is forked once and then runs job after job.

    RQ forks a fresh work-horse per job. For a short job (a sync page walk takes
    tens of milliseconds of CPU) the fork, the child's copy-on-write faults, a new
    database connection and the child's exit cost more than the job itself. This
    worker keeps what the fork buys and drops the per-job price:

    * the horse is still a child process leading its own process group; the parent
      still dequeues, keeps the heartbeats and watches the horse exactly as RQ's
      ``Worker.monitor_work_horse`` does, so a horse killed mid-job (kill -9, OOM)
      costs that one job, which RQ marks "Work-horse terminated unexpectedly" and
      retries, and a killed worker's job is found by RQ's maintenance as before;
    * the parent hands each job to the live horse over a pipe (job id, queue name,
      execution id; the horse re-reads them from Redis, as RQ's ``SpawnWorker``
      does) and the horse answers on a second pipe when the job has ended;
    * the horse keeps its database connections and warm caches between jobs, and
      retires after ``max_horse_jobs`` jobs or once its RSS grew by
      ``max_horse_growth`` bytes, so memory stays flat; the next job forks a new one.
    """

    max_horse_jobs = 1000
    max_horse_growth = 48 * 1024 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._horse: _Horse | None = None

    # -- the parent's side ----------------------------------------------------------
    def fork_work_horse(self, job, queue) -> None:
        horse = self._horse
        if horse is not None and _exited(horse.pid):
            # Died while idle (an OOM kill, an operator's kill): the job goes to a new one.
            self._reap(horse)
            horse = None
        if horse is None:
            horse = self._horse = self._start_horse()
        os.environ["RQ_WORKER_ID"] = self.name
        os.environ["RQ_JOB_ID"] = job.id
        message = f"{job.id} {queue.name} {self.execution.id}\n".encode()
        # A horse that died between jobs: wait_for_horse reaps it and RQ fails the job.
        with contextlib.suppress(BrokenPipeError):
            os.write(horse.to_horse, message)
        self._horse_pid = horse.pid
        self.procline(f"Handed {job.id} to horse {horse.pid} at {time.time()}")

    def _start_horse(self) -> _Horse:
        to_horse_r, to_horse_w = os.pipe()
        from_horse_r, from_horse_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(to_horse_w)
            os.close(from_horse_r)
            os.setpgrp()
            try:
                self._serve_jobs(to_horse_r, from_horse_w)
            finally:
                os._exit(0)
        os.close(to_horse_r)
        os.close(from_horse_w)
        return _Horse(pid=pid, to_horse=to_horse_w, from_horse=from_horse_r)

    def wait_for_horse(self):
        """Block until the horse reports the job done (``(pid, 0, None)``, RQ's "exited
        normally") or dies (its real wait status). RQ's monitor interrupts this with
        its heartbeat alarm, as it interrupts ``os.wait4``."""
        horse = self._horse
        if horse is None:
            return None, None, None
        reply = os.read(horse.from_horse, 64)
        if reply.startswith(b"done"):
            if reply.startswith(b"done retire"):
                self._reap(horse)
            return horse.pid, os.EX_OK, None
        return self._reap(horse)  # end of file: the horse died mid-job

    def _reap(self, horse: _Horse):
        self._horse = None
        os.close(horse.to_horse)
        os.close(horse.from_horse)
        pid = status = rusage = None
        with contextlib.suppress(ChildProcessError):
            pid, status, rusage = os.wait4(horse.pid, 0)
        return pid, status, rusage

    def teardown(self) -> None:
        horse = self._horse
        if horse is not None and not self.is_horse:
            # End of file on its pipe ends an idle horse; a busy one was already
            # waited for (warm shutdown) or killed (cold shutdown).
            os.close(horse.to_horse)
            horse.to_horse = os.open(os.devnull, os.O_WRONLY)
            deadline = time.monotonic() + 10
            while os.waitpid(horse.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(horse.pid, signal.SIGKILL)
                time.sleep(0.02)
            self._horse = None
        super().teardown()

    # -- the horse's side -----------------------------------------------------------
    def _serve_jobs(self, jobs_fd: int, replies_fd: int) -> None:
        from rq.executions import Execution

        random.seed()
        self.setup_work_horse_signals()
        self._is_horse = True
        self.log = rq_worker_logger
        queues = {queue.name: queue for queue in self.queues}
        baseline = _rss()
        served = 0
        with os.fdopen(jobs_fd, "rb", buffering=0) as jobs:
            while True:
                line = _read_line(jobs)
                if not line:
                    return  # the worker closed the pipe or died
                job_id, queue_name, execution_id = line.decode().split()
                os.environ["RQ_JOB_ID"] = job_id
                try:
                    job = self.job_class.fetch(job_id, connection=self.connection,
                                               serializer=self.serializer)
                    execution = Execution.fetch(execution_id, job.id,
                                                connection=self.connection)
                    execution._job = job
                    self.execution = execution
                    self.perform_job(job, queues[queue_name], execution)
                except BaseException:
                    # What a forked horse does when perform_job itself breaks: die, so
                    # the worker records the job as terminated unexpectedly.
                    os._exit(1)
                served += 1
                retire = served >= self.max_horse_jobs or \
                    _rss() - baseline > self.max_horse_growth
                os.write(replies_fd, b"done retire\n" if retire else b"done\n")
                if retire:
                    return


class _Horse:
    def __init__(self, *, pid: int, to_horse: int, from_horse: int):
        self.pid = pid
        self.to_horse = to_horse
        self.from_horse = from_horse


def _exited(pid: int) -> bool:
    """Whether the child ``pid`` has exited; reaps it if so."""
    try:
        return os.waitpid(pid, os.WNOHANG) != (0, 0)
    except ChildProcessError:
        return True


def _read_line(stream) -> bytes:
    """One newline-terminated message (the worker writes each in one ``write``)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = stream.read(256)
        if not chunk:
            return b""
        data += chunk
    return data


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
