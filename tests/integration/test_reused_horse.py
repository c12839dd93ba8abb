"""The worker's reused work-horse: one forked child runs job after job, retires on
schedule, and a horse that dies mid-job costs that job only (RQ fails it as
"terminated unexpectedly" and the next job gets a fresh horse)."""

from __future__ import annotations

import os
import signal

from rq.job import JobStatus
from rq.registry import FailedJobRegistry

from partner_app.queueing import QUEUE_DEFAULT, get_queue, get_redis
from tests.integration.test_sync import _FORK_SAFE
from workers.app_worker import ReusedHorseWorker, prepare_for_fork


def horse_pid() -> int:
    return os.getpid()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _work(app, *, max_horse_jobs: int) -> None:
    if id(app) not in _FORK_SAFE:
        prepare_for_fork(app)
        _FORK_SAFE.add(id(app))
    worker = ReusedHorseWorker([get_queue(QUEUE_DEFAULT, app)], connection=get_redis(app),
                               app=app)
    worker.max_horse_jobs = max_horse_jobs
    worker.work(burst=True, with_scheduler=False)


def test_one_horse_runs_many_jobs_and_retires_after_its_quota(app_ctx):
    queue = get_queue(QUEUE_DEFAULT, app_ctx)
    jobs = [queue.enqueue(f"{__name__}.horse_pid") for _ in range(5)]
    _work(app_ctx, max_horse_jobs=2)
    pids = [job.latest_result().return_value for job in jobs]
    assert os.getpid() not in pids  # run in a child, not in the worker
    # Two jobs per horse: 5 jobs take three horses, in order.
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert len(set(pids)) == 3


def test_a_horse_killed_mid_job_fails_that_job_only(app_ctx):
    queue = get_queue(QUEUE_DEFAULT, app_ctx)
    before = queue.enqueue(f"{__name__}.horse_pid")
    killed = queue.enqueue(f"{__name__}.die")
    after = queue.enqueue(f"{__name__}.horse_pid")
    _work(app_ctx, max_horse_jobs=100)
    assert killed.get_status() == JobStatus.FAILED
    assert killed.id in FailedJobRegistry(queue=queue).get_job_ids()
    assert "terminated unexpectedly" in (killed.latest_result().exc_string or "")
    first, last = before.latest_result().return_value, after.latest_result().return_value
    assert first != last  # the dead horse was replaced
    assert after.get_status() == JobStatus.FINISHED
