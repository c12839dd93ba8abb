"""RedisRateLimiter against real Redis servers: the machine's (a dedicated db) and the
embedded one, every test on both.

Window arithmetic, cooldowns, waiting versus re-scheduling, the token reserve, the
global budget and its fair share, TTL hygiene, many threads at once (checked exactly
against the admission times Redis's clock gave), and T-14: callers whose clocks are ten
minutes off decide exactly like the others, where a limiter stamping entries with the
caller's clock mis-counts.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from partner_app import embedded_redis
from partner_app.stora.errors import RateLimitWait
from partner_app.stora.ratelimit import (
    Decision,
    RateLimitSettings,
    RedisRateLimiter,
    limiter_from_settings,
)

MACHINE_REDIS = "redis://127.0.0.1:6379/13"
SKEW = 600.0  # T-14: ten minutes either way


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_url(tmp_path_factory) -> Iterator[str]:
    instance = str(tmp_path_factory.mktemp("rl-embedded"))
    url = embedded_redis.ensure_running(instance)
    yield url
    embedded_redis.stop(instance)


@pytest.fixture(params=["machine", "embedded"])
def redis_url(request) -> str:
    if request.param == "embedded":
        return request.getfixturevalue("embedded_url")
    try:
        redis.Redis.from_url(MACHINE_REDIS, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return MACHINE_REDIS


@pytest.fixture
def conn(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def max_in_window(times: list[float], width: float) -> int:
    """Most of ``times`` inside any half-open interval ``[s, s + width)`` (exact)."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one takes everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


class RecordingLimiter(RedisRateLimiter):
    """Keeps the Redis-clock time of every admission, per key."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.admitted: dict[str, list[float]] = defaultdict(list)

    def try_acquire(self, key: str, *, kind: str = "api") -> Decision:
        decision = super().try_acquire(key, kind=kind)
        if decision.admitted:
            self.admitted[key].append(decision.at)
        return decision


def hammer(limiter: RedisRateLimiter, keys: list[str], seconds: float) -> None:
    """Call ``acquire`` for random ready keys as fast as admitted for ``seconds``; a key
    that raises RateLimitWait is set aside for ``retry_after``, as a re-scheduled job."""
    deadline = time.monotonic() + seconds
    ready_at = dict.fromkeys(keys, 0.0)
    while (now := time.monotonic()) < deadline:
        ready = [k for k, at in ready_at.items() if at <= now]
        if not ready:
            time.sleep(max(0.0, min(min(ready_at.values()), deadline) - now))
            continue
        key = random.choice(ready)
        try:
            limiter.acquire(key)
        except RateLimitWait as exc:
            ready_at[key] = time.monotonic() + exc.retry_after


def run_threads(count: int, target, *args) -> None:
    threads = [threading.Thread(target=target, args=args) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# -- window arithmetic -----------------------------------------------------------------


def test_per_second_window_admits_n_then_waits_for_the_oldest_to_age_out(conn):
    limiter = RedisRateLimiter(conn, per_second=5, per_minute=100, margin=0.05)
    admitted = [limiter.try_acquire("op") for _ in range(5)]
    assert all(d.admitted for d in admitted)

    refused = limiter.try_acquire("op")
    assert not refused.admitted and refused.reason == "key_second"
    assert refused.wait == pytest.approx(admitted[0].at + 1.05 - refused.at, abs=2e-6)

    time.sleep(refused.wait)
    later = limiter.try_acquire("op")
    assert later.admitted and later.at >= admitted[0].at + 1.05


def test_per_minute_window_says_when_its_oldest_call_leaves(conn):
    limiter = RedisRateLimiter(conn, per_second=100, per_minute=3)  # default margin 0.1
    first = limiter.try_acquire("op")
    assert limiter.try_acquire("op").admitted and limiter.try_acquire("op").admitted
    refused = limiter.try_acquire("op")
    assert refused.reason == "key_minute"
    assert refused.wait == pytest.approx(first.at + 60.1 - refused.at, abs=2e-6)
    assert limiter.try_acquire("other").admitted  # windows are per key


def test_sliding_windows_hold_exactly_with_compressed_windows(conn):
    """Both windows slide many times in 3 s: never over, and not needlessly under."""
    limiter = RecordingLimiter(conn, per_second=4, per_minute=10, second=0.2, minute=1.0,
                               margin=0.02, max_wait=0.5)
    run_threads(6, hammer, limiter, ["a", "b"], 3.0)
    for times in limiter.admitted.values():
        assert max_in_window(times, 0.2) <= 4
        assert max_in_window(times, 1.0) <= 10
        assert len(times) >= 25  # ~10 per 1.02 s over 3 s


def test_threads_never_exceed_stora_limits_on_the_redis_clock(conn):
    """16 threads on 3 keys for 7 s with Stora's numbers: each key gets exactly 60
    (ten per 1.1 s until the minute is spent), and no window holds more."""
    limiter = RecordingLimiter(conn)  # 10/s, 60/min, margin 0.1, max_wait 2
    run_threads(16, hammer, limiter, ["k1", "k2", "k3"], 7.0)
    for key, times in limiter.admitted.items():
        assert max_in_window(times, 1.0) <= 10, key
        assert max_in_window(times, 60.0) == len(times) == 60, key
        first_eleven = sorted(times)[:11]
        assert first_eleven[10] - first_eleven[0] >= 1.1


# -- cooldowns and waiting ---------------------------------------------------------------


def test_cooldown_is_honoured_by_every_caller(conn, redis_url):
    hit = RedisRateLimiter(conn)
    others = [RecordingLimiter(redis.Redis.from_url(redis_url)) for _ in range(6)]
    armed_at = hit.try_acquire("x").at  # a call that then met a 429
    hit.backoff("op", 0.5)

    refused = others[0].try_acquire("op")
    assert refused.reason == "cooldown" and 0.5 < refused.wait <= 0.6
    assert others[0].try_acquire("op", kind="token").reason == "cooldown"
    assert others[0].try_acquire("other-op").admitted  # operator scope: one key only

    threads = [threading.Thread(target=o.acquire, args=("op",)) for o in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    times = [t for o in others for t in o.admitted["op"]]
    assert len(times) == 6 and min(times) >= armed_at + 0.6
    for other in others:
        other.redis.close()


def test_application_scope_makes_a_429_pause_every_key(conn):
    limiter = RedisRateLimiter(conn, scope="application")
    limiter.backoff("op", 1.0)
    for key in ("op", "another", "a-third"):
        decision = limiter.try_acquire(key)
        assert decision.reason == "cooldown" and 1.0 < decision.wait <= 1.1


def test_backoff_never_shortens_a_pause_and_clamps_absurd_ones(conn):
    limiter = RedisRateLimiter(conn)
    limiter.backoff("op", 5)
    limiter.backoff("op", 1)
    assert 5000 < conn.pttl(limiter.cooldown_key("op")) <= 5100
    limiter.backoff("op", 600)  # e.g. RateLimit-Reset read with a clock 10 min slow
    assert 59_000 < conn.pttl(limiter.cooldown_key("op")) <= 60_100


def test_acquire_raises_ratelimitwait_beyond_max_wait(conn):
    limiter = RedisRateLimiter(conn, per_second=1, max_wait=0.2)
    limiter.acquire("op")
    with pytest.raises(RateLimitWait) as raised:
        limiter.acquire("op")
    assert raised.value.retryable and raised.value.code == "key_second"
    assert 1.0 < raised.value.retry_after <= 1.1


def test_acquire_sleeps_in_process_within_max_wait(conn):
    limiter = RecordingLimiter(conn, per_second=1, max_wait=2.0)
    limiter.acquire("op")
    started = time.monotonic()
    limiter.acquire("op")
    assert 1.0 <= time.monotonic() - started < 1.5
    first, second = limiter.admitted["op"]
    assert second - first >= 1.1


def test_kind_and_key_are_validated(conn):
    limiter = RedisRateLimiter(conn)
    with pytest.raises(ValueError, match="kind"):
        limiter.try_acquire("op", kind="bulk")
    with pytest.raises(ValueError, match="key"):
        limiter.try_acquire("")


# -- global budget, token reserve, fair share ---------------------------------------------


def test_global_budget_caps_all_keys_together(conn):
    limiter = RedisRateLimiter(conn, global_per_second=6, token_reserve=0)
    decisions = [limiter.try_acquire(f"op{i}") for i in range(20)]
    admitted = [d for d in decisions if d.admitted]
    assert len(admitted) == 6
    refused = decisions[6]
    assert refused.reason == "global_second"
    assert refused.wait == pytest.approx(admitted[0].at + 1.1 - refused.at, abs=2e-6)


def test_token_calls_use_the_reserve_that_api_calls_cannot(conn):
    limiter = RedisRateLimiter(conn, global_per_second=10, token_reserve=0.2)
    assert [limiter.try_acquire(f"op{i}").admitted for i in range(9)] == [True] * 8 + [False]
    assert limiter.try_acquire("op9").reason == "global_second"
    assert limiter.try_acquire("op9", kind="token").admitted
    assert limiter.try_acquire("op0", kind="token").admitted
    assert limiter.try_acquire("op0", kind="token").reason == "global_second"


def test_token_calls_are_not_blocked_by_a_full_per_key_window(conn):
    limiter = RedisRateLimiter(conn, per_second=2)
    assert limiter.try_acquire("op").admitted and limiter.try_acquire("op").admitted
    assert limiter.try_acquire("op").reason == "key_second"
    assert limiter.try_acquire("op", kind="token").admitted
    assert conn.zcard(limiter.log_key("op")) == 2  # the token call is not in the key's log


def test_share_spacing_follows_the_number_of_active_keys(conn):
    limiter = RedisRateLimiter(conn, global_per_second=10, token_reserve=0)
    rate = 10 / 1.1
    first = limiter.try_acquire("a")
    alone = limiter.try_acquire("a")
    assert alone.reason == "share"
    assert alone.wait == pytest.approx(first.at + 1 / rate - alone.at, abs=2e-6)
    assert limiter.try_acquire("b").admitted and limiter.try_acquire("c").admitted
    crowded = limiter.try_acquire("a")
    assert crowded.reason == "share"
    assert crowded.wait == pytest.approx(first.at + 3 / rate - crowded.at, abs=2e-6)


def test_a_flooding_key_gets_no_more_than_its_share(conn):
    """Six threads flood one key, one thread each drives three others: over the same
    span of Redis time every key gets the same share of the global budget, which is
    never exceeded."""
    limiter = RecordingLimiter(conn, global_per_second=20, token_reserve=0, max_wait=0.5)
    # All four count as active from the start, so the share is the same throughout.
    t0 = min(limiter.try_acquire(key).at for key in ("flood", "a", "b", "c"))
    threads = [threading.Thread(target=hammer, args=(limiter, ["flood"], 4.0))
               for _ in range(6)]
    threads += [threading.Thread(target=hammer, args=(limiter, [key], 4.0))
                for key in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    span = 3.5  # threads stop at slightly different times after 4 s; compare before
    counts = {key: sum(t < t0 + span for t in times)
              for key, times in limiter.admitted.items()}
    fair = [counts[k] for k in ("a", "b", "c")]
    spacing = 4 / (20 / 1.1)  # four active keys share 20 per 1.1 s
    assert counts["flood"] <= span / spacing + 1
    assert counts["flood"] <= max(fair) + 1
    assert jain(fair) >= 0.99
    assert max_in_window([t for ts in limiter.admitted.values() for t in ts], 1.0) <= 20


# -- TTL hygiene -----------------------------------------------------------------------------


def test_every_key_is_namespaced_and_expires(conn):
    limiter = RedisRateLimiter(conn, global_per_second=50, second=0.1, minute=0.3,
                               active_window=0.3, margin=0.0)
    for i in range(5):
        limiter.try_acquire(f"op{i}")
        limiter.try_acquire(f"op{i}", kind="token")
    limiter.backoff("op0", 0.2)
    keys = [k.decode() for k in conn.scan_iter("*")]
    assert keys and all(k.startswith("stora:rl:") for k in keys)
    for key in keys:
        assert 0 < conn.pttl(key) <= 1300, key
    time.sleep(1.5)
    assert list(conn.scan_iter("*")) == []


def test_logs_stay_bounded_however_often_a_key_is_refused(conn):
    limiter = RedisRateLimiter(conn, global_per_second=1000)
    for _ in range(300):
        limiter.try_acquire("op")
    assert conn.zcard(limiter.log_key("op")) <= 60
    assert conn.zcard(limiter.global_log_key) <= 1000
    assert conn.zcard(limiter.active_key) == 1


# -- T-14: clock skew --------------------------------------------------------------------------


class ClientClockLimiter:
    """The same sliding log, but stamped with the caller's ``time.time()``, as the
    ``limits`` moving window and pyrate-limiter's ``RedisBucket`` do (reliability.md
    §7.3). Atomic in Redis, and still wrong when clocks disagree."""

    SCRIPT = """
    local now, len, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
    local n = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now - len), '+inf')
    if n >= limit then return 0 end
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
    return 1
    """

    def __init__(self, conn: redis.Redis, per_second: int):
        self.per_second = per_second
        self._script = conn.register_script(self.SCRIPT)

    def try_acquire(self, key: str) -> bool:
        now = round(time.time() * 1_000_000)
        member = f"{now}:{random.random()}"
        return bool(self._script(keys=[f"naive:{key}"],
                                 args=[now, 1_000_000, self.per_second, member]))


def _limiter(kind: str, conn: redis.Redis):
    if kind == "redis_time":
        return RedisRateLimiter(conn, per_second=10, per_minute=1000)
    return ClientClockLimiter(conn, per_second=10)


def _admit(limiter, calls: int) -> list[dict]:
    """``calls`` attempts; each as ``{"admitted", "wait"}`` (wait None when unknown)."""
    out = []
    for _ in range(calls):
        if isinstance(limiter, RedisRateLimiter):
            decision = limiter.try_acquire("op")
            out.append({"admitted": decision.admitted, "wait": decision.wait})
        else:
            out.append({"admitted": limiter.try_acquire("op"), "wait": None})
    return out


def skewed_caller(redis_url: str, shift: float, pipe) -> None:
    """Child process: run with the wall clock moved by ``shift`` seconds and answer
    ``(limiter kind, calls)`` requests until told ``None``."""
    import time_machine

    with time_machine.travel(time.time() + shift, tick=True):
        conn = redis.Redis.from_url(redis_url)
        limiters = {kind: _limiter(kind, conn) for kind in ("redis_time", "client_clock")}
        pipe.send(("ready", time.time()))
        while (request := pipe.recv()) is not None:
            kind, calls = request
            pipe.send(_admit(limiters[kind], calls))
        conn.close()


@pytest.fixture
def skewed(redis_url) -> Iterator[dict[str, Any]]:
    """Two live callers, one ten minutes behind and one ten minutes ahead."""
    pytest.importorskip("time_machine", reason="T-14 needs time-machine (test extras)")
    context = multiprocessing.get_context("spawn")
    callers, processes = {}, []
    for name, shift in (("behind", -SKEW), ("ahead", SKEW)):
        ours, theirs = context.Pipe()
        process = context.Process(target=skewed_caller, args=(redis_url, shift, theirs),
                                  daemon=True)
        process.start()
        processes.append(process)
        callers[name] = ours
    for name, shift in (("behind", -SKEW), ("ahead", SKEW)):
        assert callers[name].poll(30), f"{name} caller did not start"
        tag, their_now = callers[name].recv()
        assert tag == "ready" and abs(their_now - time.time() - shift) < 5
    yield callers
    for pipe in callers.values():
        pipe.send(None)
    for process in processes:
        process.join(10)


def _call(pipe, kind: str, calls: int) -> list[dict]:
    pipe.send((kind, calls))
    assert pipe.poll(10)
    return pipe.recv()


@pytest.mark.parametrize("kind", ["redis_time", "client_clock"])
def test_clock_skew_does_not_change_decisions(conn, skewed, kind):
    """T-14. Within one real second: the slow caller makes 5 calls, we make 10, the
    fast caller makes 5. The limit is 10 per second.

    On Redis's clock exactly 10 are admitted and the skewed callers are told to wait
    about a second. Stamped with callers' clocks, all 20 are admitted (each caller sees
    the others' calls as expired), and the fast caller's entries, dated ten minutes
    ahead, then halve everyone's budget for ten minutes.
    """
    limiter = _limiter(kind, conn)
    started = time.monotonic()
    behind = _call(skewed["behind"], kind, 5)
    ours = _admit(limiter, 10)
    ahead = _call(skewed["ahead"], kind, 5)
    assert time.monotonic() - started < 0.9, "too slow to fit one window; the test proves nothing"
    admitted = sum(c["admitted"] for c in behind + ours + ahead)

    time.sleep(1.2)
    after = sum(c["admitted"] for c in _admit(limiter, 10))

    if kind == "redis_time":
        assert admitted == 10
        assert [c["admitted"] for c in behind] == [True] * 5
        assert [c["admitted"] for c in ahead] == [False] * 5
        assert all(0 < c["wait"] <= 1.1 for c in ahead)
        assert after == 10
    else:
        assert admitted == 20  # twice the limit in under a second
        assert after == 5      # and only half of it for the next ten minutes


# -- configuration ---------------------------------------------------------------------------


def test_settings_defaults_and_parsing():
    assert RateLimitSettings.from_env({}) == RateLimitSettings()
    settings = RateLimitSettings.from_env({
        "STORA_RATE_PER_SECOND": "8", "STORA_RATE_PER_MINUTE": "50",
        "STORA_GLOBAL_RATE_PER_SECOND": "10", "STORA_GLOBAL_RATE_PER_MINUTE": "60",
        "STORA_RATE_TOKEN_RESERVE": "0.2", "STORA_RATE_MARGIN_MS": "50",
        "STORA_RATE_MAX_WAIT": "1.5", "STORA_RATE_LIMIT_SCOPE": "Application"})
    assert settings == RateLimitSettings(
        per_second=8, per_minute=50, global_per_second=10, global_per_minute=60,
        token_reserve=0.2, margin_ms=50, max_wait=1.5, scope="application")


def test_settings_report_every_bad_variable():
    _, problems = RateLimitSettings.parse({
        "STORA_RATE_PER_SECOND": "ten", "STORA_GLOBAL_RATE_PER_SECOND": "0",
        "STORA_RATE_TOKEN_RESERVE": "0.9", "STORA_RATE_LIMIT_SCOPE": "ip"})
    assert len(problems) == 4
    assert any("STORA_RATE_PER_SECOND" in p for p in problems)
    assert any("STORA_RATE_LIMIT_SCOPE" in p for p in problems)
    with pytest.raises(ValueError, match="STORA_RATE_TOKEN_RESERVE"):
        RateLimitSettings.from_env({"STORA_RATE_TOKEN_RESERVE": "0.9"})


def test_limiter_from_settings(conn):
    limiter = limiter_from_settings(RateLimitSettings(global_per_second=10, margin_ms=50,
                                                      scope="application"), conn)
    assert (limiter.global_per_second, limiter.scope) == (10, "application")
    assert limiter.second == pytest.approx(1.05) and limiter.minute == pytest.approx(60.05)

    class AppSettings:
        rate_limit = RateLimitSettings(per_second=3)

    assert limiter_from_settings(AppSettings(), conn).per_second == 3
