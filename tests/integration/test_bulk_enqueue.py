"""The fan-out's bulk enqueue writes, in Redis, exactly what RQ's own ``Queue.enqueue``
writes for the same rate-limited jobs: the job hashes, the queue, and each limit's
registration, slots and waiting set. One operator's slot is already taken, so both
paths must leave its job waiting, and the others queued."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from partner_app.queueing import QUEUE_SYNC, get_queue, get_redis
from partner_app.sync import bulk_enqueue
from partner_app.sync import jobs as sync_jobs

RUN_ID = 41
OPERATORS = [7, 8, 9]
BUSY = 9  # another job holds this operator's only slot
# Stamped with the clock at write time: they differ between any two enqueues.
CLOCK_FIELDS = {"created_at", "enqueued_at"}


def _enqueue_with_rq(queue) -> None:
    for operator_id in OPERATORS:
        queue.enqueue(sync_jobs.SYNC_OPERATOR, args=(RUN_ID, operator_id),
                      job_id=sync_jobs.job_id(RUN_ID, operator_id),
                      job_timeout=sync_jobs.JOB_TIMEOUT, result_ttl=sync_jobs.RESULT_TTL,
                      failure_ttl=sync_jobs.FAILURE_TTL, retry=sync_jobs.SYNC_RETRY,
                      meta={"retry_max": sync_jobs.SYNC_RETRY.max},
                      rate_limit=sync_jobs.operator_rate_limit(operator_id))


def _snapshot(connection) -> dict[str, Any]:
    """Every key RQ wrote, by type; clock fields and scores (timestamps) left out."""
    state: dict[str, Any] = {}
    for raw in connection.scan_iter("rq:*"):
        key = raw.decode()
        kind = connection.type(key).decode()
        if kind == "hash":
            value = {k.decode(): v for k, v in connection.hgetall(key).items()
                     if k.decode() not in CLOCK_FIELDS}
        elif kind == "list":
            value = connection.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(connection.smembers(key))
        elif kind == "zset":
            value = connection.zrange(key, 0, -1)
        else:
            value = connection.get(key)
        state[key] = (kind, value)
    return state


@pytest.fixture
def fresh(app_ctx):
    connection = get_redis(app_ctx)

    def reset():
        connection.flushdb()
        connection.zadd(f"rq:rl:operator:{BUSY}:allowed", {"sync-1-9": 1.0})
        return connection

    return reset


@pytest.mark.parametrize("chunk", [sync_jobs.ENQUEUE_CHUNK, 1])
def test_bulk_enqueue_writes_what_rq_writes(app_ctx, fresh, monkeypatch, chunk):
    """With one script call for the three jobs, and with one call per job (sent before
    any reply is read); Redis's script cache emptied first, as by a restart."""
    monkeypatch.setattr(sync_jobs, "ENQUEUE_CHUNK", chunk)
    queue = get_queue(QUEUE_SYNC, app_ctx)
    assert bulk_enqueue.key_layout(queue.connection) == "rq:rl:"

    connection = fresh()
    _enqueue_with_rq(queue)
    by_rq = _snapshot(connection)

    connection = fresh()
    connection.script_flush()
    ids = sync_jobs.enqueue_operator_jobs(queue, RUN_ID, OPERATORS)
    by_bulk = _snapshot(connection)

    assert ids == [sync_jobs.job_id(RUN_ID, op) for op in OPERATORS]
    assert by_bulk == by_rq
    # What the comparison covered: two jobs queued, the busy operator's job waiting.
    assert connection.lrange(queue.key, 0, -1) == [b"sync-41-7", b"sync-41-8"]
    assert connection.zrange(f"rq:rl:operator:{BUSY}:rate_limited", 0, -1) == [b"sync-41-9"]
    statuses = {op: queue.fetch_job(sync_jobs.job_id(RUN_ID, op)).get_status()
                for op in OPERATORS}
    assert statuses == {7: "queued", 8: "queued", 9: "rate_limited"}


@pytest.mark.parametrize("path", ["one script", "pipelined"])
def test_jobs_that_exist_already_are_left_as_they_are(app_ctx, fresh, monkeypatch, path):
    """A fan-out that re-runs a batch (its parent died after the Redis write) writes
    only the jobs that are missing; an existing job, queued or waiting, is untouched
    and not queued a second time."""
    if path == "pipelined":  # what happens when RQ's key layout is not the expected one
        monkeypatch.setattr(bulk_enqueue, "key_layout", lambda connection: None)
    queue = get_queue(QUEUE_SYNC, app_ctx)
    connection = fresh()
    assert sync_jobs.enqueue_operator_jobs(queue, RUN_ID, OPERATORS[:2]) == [
        sync_jobs.job_id(RUN_ID, op) for op in OPERATORS[:2]]
    before = _snapshot(connection)

    ids = sync_jobs.enqueue_operator_jobs(queue, RUN_ID, OPERATORS)

    assert ids == [sync_jobs.job_id(RUN_ID, BUSY)]
    after = _snapshot(connection)
    shared = "rq:rl-keys"  # every limit's key, the new job's included
    assert {key: value for key, value in after.items() if key in before and key != shared} \
        == {key: value for key, value in before.items() if key != shared}
    assert after[shared] == ("set", [b"operator:7", b"operator:8", b"operator:9"])
    assert connection.lrange(queue.key, 0, -1) == [b"sync-41-7", b"sync-41-8"]
    assert connection.zrange(f"rq:rl:operator:{BUSY}:rate_limited", 0, -1) == [b"sync-41-9"]


def test_a_connection_the_server_dropped_is_not_used(app_ctx, fresh):
    """The streamed calls take their connection straight from the pool: one the server
    dropped while it sat there (a restart, a failover) is replaced at checkout, and
    the jobs come out as if nothing had happened."""
    queue = get_queue(QUEUE_SYNC, app_ctx)
    connection = fresh()
    sync_jobs.enqueue_operator_jobs(queue, RUN_ID, OPERATORS[:1])
    pool = connection.connection_pool
    killer = redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **pool.connection_kwargs))
    assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
    killer.close()

    ids = sync_jobs.enqueue_operator_jobs(queue, RUN_ID, OPERATORS)

    assert ids == [sync_jobs.job_id(RUN_ID, op) for op in OPERATORS[1:]]
    assert connection.lrange(queue.key, 0, -1) == [b"sync-41-7", b"sync-41-8"]
    assert connection.zrange(f"rq:rl:operator:{BUSY}:rate_limited", 0, -1) == [b"sync-41-9"]
