"""Writing many rate-limited RQ jobs with a few Lua calls.

A fan-out enqueues one job per operator, each under its own ``RateLimit``. RQ's own
path for such a job (``Queue._enqueue_rate_limited_job``) is five commands: register
the limit's key and concurrency, write the job hash (about forty fields), add the job
to the limit's waiting set, then RQ's promotion script. Pipelined, that is cheap for
Redis but not for the client: packing forty fields per job into the protocol took most
of the fan-out's CPU. Here the fields every job of a run shares are sent once per
script call, each job adds only its id, arguments, description and limit key, and the
script performs the same five steps per job inside Redis.

A job id that already exists is skipped inside the same script: writing it again
would put a live job on its queue twice. Checking there, atomically, replaces a
separate pipeline of ``EXISTS`` per job, which cost the client as much again.

The promotion step is RQ's own ``ACQUIRE_AND_ENQUEUE_SCRIPT``, wrapped as a Lua
function (its ``KEYS`` and ``ARGV`` become the function's parameters), so which job gets
a slot, and how it is pushed onto its queue and marked queued, stays RQ's logic. The
rate-limit key names are derived from ``RateLimitRegistry`` itself and checked
(``key_layout``); if an RQ upgrade changes them, ``key_layout`` returns None and the
caller uses its pipelined path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis import Redis
from rq.job import Job
from rq.queue import Queue
from rq.rate_limit import ACQUIRE_AND_ENQUEUE_SCRIPT, RateLimitRegistry
from rq.utils import current_timestamp, now, utcformat

_PROBE = "layout-probe"

_ACQUIRE = "local function acquire(KEYS, ARGV)\n" + ACQUIRE_AND_ENQUEUE_SCRIPT + "\nend\n"
_SCRIPT = _ACQUIRE + """
local rl_keys, rl_prefix, queue_prefix, job_prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local concurrency, timestamp, enqueued_at = ARGV[5], ARGV[6], ARGV[7]
local fields = tonumber(ARGV[8])
local shared = {}
for i = 9, 8 + 2 * fields do
    shared[#shared + 1] = ARGV[i]
end
local skipped = {}
for i = 9 + 2 * fields, #ARGV, 4 do
    local job_id, data, description, limit = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local job_key = job_prefix .. job_id
    if redis.call('EXISTS', job_key) == 1 then
        skipped[#skipped + 1] = job_id
    else
        local config = rl_prefix .. limit
        redis.call('SADD', rl_keys, limit)
        redis.call('HSET', config, 'concurrency', concurrency)
        redis.call('HSET', job_key, unpack(shared))
        redis.call('HSET', job_key, 'data', data, 'description', description,
                   'rate_limit_key', limit)
        redis.call('ZADD', config .. ':rate_limited', timestamp, job_id)
        acquire({config .. ':allowed', config .. ':rate_limited'},
            {concurrency, timestamp, enqueued_at, queue_prefix, job_prefix})
    end
end
return skipped
"""

_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()

# Fields a job writes per operator; everything else in the hash is shared by the batch.
PER_JOB_FIELDS = ("data", "description", "rate_limit_key")


def key_layout(connection: Redis) -> str | None:
    """The prefix of RQ's rate-limit keys (``rq:rl:``), or None if they are not
    ``{prefix}{key}``, ``…:allowed`` and ``…:rate_limited`` as the script assumes."""
    registry = RateLimitRegistry(key=_PROBE, connection=connection)  # no round trip
    config = registry.config_key
    if not config.endswith(_PROBE):
        return None
    if (registry.allowed_key, registry.rate_limited_key) != (f"{config}:allowed",
                                                             f"{config}:rate_limited"):
        return None
    return config[: -len(_PROBE)]


def write_jobs(connection: Redis, queue: Queue, shared: Mapping[str, Any],
               chunks: Iterable[Sequence[tuple[str, bytes, str, str]]], *, concurrency: int,
               rate_limit_prefix: str) -> set[str]:
    """Write the jobs of ``chunks`` (each job: id, data, description, rate-limit key) as
    rate-limited jobs of ``queue`` whose other hash fields are ``shared``, and promote
    each into a free slot of its limit as RQ would (the rest wait in their limit's set
    until a slot frees). A job whose id exists already is left as it is. Returns the
    ids so skipped.

    One script call per chunk, each sent as soon as the chunk is built and the replies
    read at the end: the caller builds the next chunk (pulling from ``chunks``) while
    Redis runs the script for the one before, so the client's work and Redis's overlap
    instead of taking turns, on one connection and with one wait. Each call is atomic
    by itself; an error leaves the chunks before it written (a fan-out re-run skips
    them) and drops the connection rather than leave replies unread on it.
    """
    head: list[Any] = [RateLimitRegistry.rl_keys_key, rate_limit_prefix,
                       Queue.redis_queue_namespace_prefix, Job.redis_job_namespace_prefix,
                       concurrency, current_timestamp(), utcformat(now())]
    flat_shared: list[Any] = []
    for name, value in shared.items():
        if name not in PER_JOB_FIELDS:
            flat_shared += (name, value)
    head += [len(flat_shared) // 2, *flat_shared]
    pool = connection.connection_pool
    # The pool checks a connection at checkout and replaces one the server dropped
    # while it sat idle (a restart); a drop during the calls raises, and the fan-out's
    # next try skips the jobs already written.
    conn = pool.get_connection()
    try:
        # Loaded on the same connection ahead of the calls: Redis runs commands in
        # order, so the script is there for them, even after a restart emptied its cache.
        conn.send_command("SCRIPT", "LOAD", _SCRIPT)
        calls = 0
        for jobs in chunks:
            if not jobs:
                continue
            args = list(head)
            for job in jobs:
                args += job
            conn.send_command("EVALSHA", _SCRIPT_SHA, 0, *args)
            calls += 1
        conn.send_command("SADD", queue.redis_queues_keys, queue.key)
        replies = [conn.read_response() for _ in range(calls + 2)]
    except BaseException:
        conn.disconnect()  # replies may be left unread on it
        raise
    finally:
        pool.release(conn)
    return {one.decode() for skipped in replies[1:-1] for one in skipped}
