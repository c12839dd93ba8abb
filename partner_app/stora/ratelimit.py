"""Admission control for calls to Stora, shared by every worker through Redis.

Stora allows 10 requests per second and 60 per minute, answers 429 beyond that and does
not say what the limit is keyed on (``shared/stora-api/api-conventions.md`` §7).
:class:`RedisRateLimiter` implements the ``RateLimiter`` protocol of
``partner_app.stora.client``: every call asks one Lua script for admission first, and
every 429 arms a cooldown that all workers honour.

The guarantee
-------------
For each limiter key (one operator connection), admitted API calls never number more
than ``per_second`` in any window of ``1 s + margin`` nor more than ``per_minute`` in
any window of ``60 s + margin``, measured on **Redis's clock**. These are exact
sliding-window logs (a ZSET of admission times per key), so they also satisfy any
fixed-window enforcement, whatever its alignment: Stora's fixed windows (Rack::Attack
style, reliability.md §7.1) never see more than the limit either.

Why the margin (default 100 ms)
-------------------------------
The guarantee holds for *admission* times; Stora counts *arrival* times. For two calls
``i`` then ``j`` with admission times ``a`` and delays to Stora ``d`` (admission, send,
network, Stora's accept), ``s_j - s_i = (a_j - a_i) + (d_j - d_i)``. Any offset between
Redis's clock and Stora's cancels; only delay *variation* matters. Spacing the
(N+1)-th call ``W + margin`` after the first keeps ``s_j - s_i >= W`` as long as the
earlier call was not delayed ``margin`` more than the later one. 100 ms covers a
garbage-collection pause, a scheduler stall on a busy worker host and a TLS handshake on
a fresh connection (one or two round trips). It is nearly free: the sustained
limit is the minute window, where 100 ms costs 0.17 % (60 per 60.1 s); the 1 s window
only shapes bursts (10 per 1.1 s). A call that still arrives early meets a 429, whose
cooldown then stops every worker for that key.

Global budget and fairness
--------------------------
If Stora turns out to count per application or IP, configure ``global_per_second``
and/or ``global_per_minute``: one more sliding log, across all keys, caps the partner as
a whole. Two rules share it:

* **Token reserve.** API calls may fill only ``limit - ceil(limit * token_reserve)`` of
  each global window; ``kind="token"`` (token-endpoint calls) may use the whole of it,
  so a bulk fan-out can never starve refreshes. With 10/s and 60/min and the default
  10 %, API traffic gets 9/s and 54/min, the headroom reliability.md §7.1 suggests.
  Token calls are not checked against or recorded in the per-key windows: the token
  endpoint is not authenticated with the operator's access token, so a per-token or
  per-operator limit cannot count them, and a flooding operator's full windows must not
  block its own refresh.
* **Fair share.** The script counts *active* keys: keys that asked for an API call
  within ``active_window`` (10 s). Each key may use at most
  ``max(global_api_rate / active_keys, share_floor)`` calls per second (the floor,
  0.1/s, only guards against an inflated count), enforced as a minimum spacing between
  its admissions. However many workers call for it, a key with 100x more pending work
  gets the same rate as every other busy key. The shares add up to the global budget,
  so arrival order, where the key with the most concurrent callers would win, decides
  only the few calls at the edge of a full global window. The share is not
  work-conserving: keys that were active in the last ``active_window`` but
  are idle now still hold their share. 10 s is long enough to keep a key whose job is
  being re-scheduled (retry-after plus RQ's 1 s scheduler poll) counted, and short
  enough that operators that synced a minute ago do not shrink today's share. Per key,
  Stora's 60/min already caps the sustained rate at 1/s, so the share mostly trims
  bursts. Without a global budget there is no share: per-key limits alone bound a
  flooding operator to 10/s and 60/min, which is all Stora would let it have anyway.

Cooldowns
---------
``backoff(key, seconds)`` sets ``stora:rl:cool:<key>`` with ``PX`` (never shortening one
already armed); with ``scope="application"`` it sets the global cooldown instead, so a
429 pauses every key. The admission script checks both before anything else.
Durations are clamped to ``max_cooldown`` (60 s): Stora's longest documented window is a
minute, so a longer wait can only come from a misread header, e.g. a ``RateLimit-Reset``
epoch converted with a skewed worker clock. If the limit really is longer, the next call
meets another 429 and re-arms the cooldown.

Waiting
-------
``acquire`` sleeps in-process only while the total wait stays within ``max_wait``;
beyond that it raises ``RateLimitWait(retry_after=...)`` so an RQ job can re-schedule
itself (``enqueue_in``) instead of holding a worker.

The script
----------
One ``EVALSHA`` per admission reads the clock with ``TIME`` (never the worker's clock,
so worker clock skew cannot corrupt the windows), checks cooldowns, per-key windows,
global windows and the fair share, and either records the call in every log or records
nothing and returns the longest wait. Scripts replicate their effects (the only mode
since Redis 7, the default since 5), so reading ``TIME`` inside one is safe. The
guarantee assumes one Redis node (every key of a call must be on the same node) and a
Redis host clock that is slewed, not stepped.

Every key lives under ``stora:rl:`` and carries a TTL refreshed on use: logs expire a
second after their longest window, cooldowns with their ``PX``; nothing grows without
bound.

Why not ``limits`` or ``pyrate-limiter``
----------------------------------------
Neither ships a distributed limiter on the server's clock (reliability.md §7.3):
``limits``' moving window and ``pyrate-limiter``'s ``RedisBucket`` both stamp entries
with the worker's ``time.time()``, so a worker whose clock is off by minutes counts the
others' calls as expired (or not yet made) and over-admits; ``limits`` also checks
several limits with separate, non-atomic calls. Neither has a global budget with a
reserved share or a per-key fair share, nor a cooldown that every worker honours.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis as redis_lib

from partner_app.envparse import number
from partner_app.stora.errors import RateLimitWait

log = logging.getLogger(__name__)

KINDS = ("api", "token")
SCOPES = ("operator", "application")
NAMESPACE = "stora:rl"

# KEYS: 1 key log (ZSET), 2 key cooldown, 3 global cooldown, 4 global log (ZSET),
#       5 active keys (ZSET key -> last API attempt)
# ARGV: 1 kind, 2 member, 3 limiter key, 4 per_second, 5 per_minute, 6 second window us,
#       7 minute window us, 8 global per second (0 = off), 9 global per minute (0 = off),
#       10 reserve per second, 11 reserve per minute, 12 global API rate per second,
#       13 share floor per second, 14 active window us
# Returns {admitted 0|1, wait us, reason, now us}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- Lua's tostring keeps 14 digits; microsecond timestamps have 16.
local function fmt(x) return string.format('%.0f', x) end

local api = ARGV[1] == 'api'
local per_second, per_minute = tonumber(ARGV[4]), tonumber(ARGV[5])
local second, minute = tonumber(ARGV[6]), tonumber(ARGV[7])
local g_second, g_minute = tonumber(ARGV[8]), tonumber(ARGV[9])
local global = g_second > 0 or g_minute > 0

local wait, reason = 0, ''
local function need(w, why)
  if w > wait then wait, reason = w, why end
end

-- Time until fewer than `limit` entries of `zkey` lie in (now - len, now].
local function window_wait(zkey, len, limit)
  local n = redis.call('ZCOUNT', zkey, '(' .. fmt(now - len), '+inf')
  if n < limit then return 0 end
  -- The limit-th most recent entry is inside the window; it has to leave it.
  local e = redis.call('ZRANGE', zkey, -limit, -limit, 'WITHSCORES')
  return tonumber(e[2]) + len - now
end

local cool = redis.call('PTTL', KEYS[2])
if cool > 0 then need(cool * 1000, 'cooldown') end
local gcool = redis.call('PTTL', KEYS[3])
if gcool > 0 then need(gcool * 1000, 'cooldown') end

if api then
  need(window_wait(KEYS[1], second, per_second), 'key_second')
  need(window_wait(KEYS[1], minute, per_minute), 'key_minute')
end

if global then
  local r_second, r_minute = 0, 0
  if api then r_second, r_minute = tonumber(ARGV[10]), tonumber(ARGV[11]) end
  if g_second > 0 then need(window_wait(KEYS[4], second, g_second - r_second), 'global_second') end
  if g_minute > 0 then need(window_wait(KEYS[4], minute, g_minute - r_minute), 'global_minute') end
  if api then
    local active_len = tonumber(ARGV[14])
    redis.call('ZADD', KEYS[5], fmt(now), ARGV[3])
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', fmt(now - active_len))
    redis.call('PEXPIRE', KEYS[5], math.ceil(active_len / 1000) + 1000)
    local rate = tonumber(ARGV[12]) / redis.call('ZCARD', KEYS[5])
    local floor = tonumber(ARGV[13])
    if rate < floor then rate = floor end
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    if last[2] then need(tonumber(last[2]) + 1000000 / rate - now, 'share') end
  end
end

if wait > 0 then
  return {0, math.ceil(wait), reason, now}
end

if api then
  local keep = math.max(second, minute)
  redis.call('ZADD', KEYS[1], fmt(now), ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - keep))
  redis.call('PEXPIRE', KEYS[1], math.ceil(keep / 1000) + 1000)
end
if global then
  local keep = second
  if g_minute > 0 then keep = math.max(second, minute) end
  redis.call('ZADD', KEYS[4], fmt(now), ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', fmt(now - keep))
  redis.call('PEXPIRE', KEYS[4], math.ceil(keep / 1000) + 1000)
end
return {1, 0, '', now}
"""

# KEYS: 1 cooldown key. ARGV: 1 milliseconds. Arms or lengthens, never shortens.
_BACKOFF = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Decision:
    """One answer of the admission script.

    ``wait`` is in seconds (0 when admitted); ``reason`` names the constraint that
    imposed the longest wait (``cooldown``, ``key_second``, ``key_minute``,
    ``global_second``, ``global_minute``, ``share``); ``at`` is Redis's clock at the
    decision, in epoch seconds.
    """

    admitted: bool
    wait: float
    reason: str | None
    at: float


def _reserve(limit: int | None, share: float) -> int:
    """Slots of a global window kept for token calls; API traffic always keeps one."""
    if not limit or share <= 0:
        return 0
    return min(limit - 1, math.ceil(limit * share))


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


class RedisRateLimiter:
    """Shared admission control for Stora calls; see the module docstring for the model.

    ``per_second``/``per_minute`` apply per key; ``global_per_second``/
    ``global_per_minute`` (None = off) across all keys. ``second`` and ``minute`` are the
    nominal window lengths (Stora's are 1 s and 60 s; other plans may differ); every
    window is measured ``margin`` seconds longer.
    """

    def __init__(self, redis: redis_lib.Redis, *, per_second: int = 10, per_minute: int = 60,
                 global_per_second: int | None = None, global_per_minute: int | None = None,
                 token_reserve: float = 0.1, max_wait: float = 2.0, margin: float = 0.1,
                 scope: str = "operator", share_floor: float = 0.1,
                 active_window: float = 10.0, max_cooldown: float = 60.0,
                 second: float = 1.0, minute: float = 60.0, namespace: str = NAMESPACE,
                 sleep: Callable[[float], None] = time.sleep):
        if per_second < 1 or per_minute < 1:
            raise ValueError("per_second and per_minute must be >= 1")
        for name, value in (("global_per_second", global_per_second),
                            ("global_per_minute", global_per_minute)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None")
        if not 0 <= token_reserve < 1:
            raise ValueError("token_reserve must be in [0, 1)")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        if min(second, minute, active_window, share_floor) <= 0 or margin < 0 \
                or max_wait < 0 or max_cooldown <= 0:
            raise ValueError("windows, share_floor and max_cooldown must be > 0; "
                             "margin and max_wait >= 0")
        self.redis = redis
        self.per_second, self.per_minute = per_second, per_minute
        self.global_per_second, self.global_per_minute = global_per_second, global_per_minute
        self.token_reserve = token_reserve
        self.max_wait, self.margin, self.scope = max_wait, margin, scope
        self.share_floor, self.active_window = share_floor, active_window
        self.max_cooldown = max_cooldown
        self.second, self.minute = second + margin, minute + margin
        self.namespace = namespace
        self._sleep = sleep
        self._reserve_second = _reserve(global_per_second, token_reserve)
        self._reserve_minute = _reserve(global_per_minute, token_reserve)
        self._admit = redis.register_script(_ADMIT)
        self._backoff = redis.register_script(_BACKOFF)

    # -- keys --------------------------------------------------------------------------
    def log_key(self, key: str) -> str:
        return f"{self.namespace}:log:{key}"

    def cooldown_key(self, key: str) -> str:
        return f"{self.namespace}:cool:{key}"

    @property
    def global_cooldown_key(self) -> str:
        return f"{self.namespace}:cool"

    @property
    def global_log_key(self) -> str:
        return f"{self.namespace}:global"

    @property
    def active_key(self) -> str:
        return f"{self.namespace}:active"

    # -- derived -----------------------------------------------------------------------
    @property
    def global_api_rate(self) -> float:
        """Sustainable API calls per second under the global budget (0 if none).

        Uses the margin-lengthened windows, so the keys' shares add up to what the
        global windows actually admit and the global check rarely has to arbitrate.
        """
        rates = []
        if self.global_per_second:
            rates.append((self.global_per_second - self._reserve_second) / self.second)
        if self.global_per_minute:
            rates.append((self.global_per_minute - self._reserve_minute) / self.minute)
        return min(rates) if rates else 0.0

    # -- protocol ----------------------------------------------------------------------
    def try_acquire(self, key: str, *, kind: str = "api") -> Decision:
        """Ask once: admit (and record) a call for ``key`` now, or say how long to wait.

        Never sleeps. Raises ValueError for an unknown ``kind`` or an empty key.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if not key:
            raise ValueError("key must be non-empty")
        keys = [self.log_key(key), self.cooldown_key(key), self.global_cooldown_key,
                self.global_log_key, self.active_key]
        args: list[Any] = [
            kind, f"{key}:{uuid.uuid4().hex}", key, self.per_second, self.per_minute,
            _us(self.second), _us(self.minute), self.global_per_second or 0,
            self.global_per_minute or 0, self._reserve_second, self._reserve_minute,
            repr(self.global_api_rate), repr(self.share_floor), _us(self.active_window)]
        admitted, wait_us, reason, now_us = self._admit(keys=keys, args=args)
        if isinstance(reason, bytes):
            reason = reason.decode()
        return Decision(admitted=bool(admitted), wait=int(wait_us) / 1_000_000,
                        reason=reason or None, at=int(now_us) / 1_000_000)

    def acquire(self, key: str, *, kind: str = "api") -> None:
        """Return once a call for ``key`` is admitted.

        Sleeps in-process while the total wait stays within ``max_wait`` seconds;
        otherwise raises ``RateLimitWait`` with ``retry_after`` (seconds) and ``code``
        (the reason), so the caller can re-schedule instead of blocking a worker.
        Redis errors propagate: without the shared state no call may go out.
        """
        deadline: float | None = None
        while True:
            decision = self.try_acquire(key, kind=kind)
            if decision.admitted:
                return
            now = time.monotonic()  # local waiting only: skew-free, unlike time.time()
            if deadline is None:
                deadline = now + self.max_wait
            if now + decision.wait > deadline:
                raise RateLimitWait(
                    f"stora rate limit for {key}: retry in {decision.wait:.3f}s "
                    f"({decision.reason})", retry_after=decision.wait, code=decision.reason)
            # A little jitter so callers woken by the same expiry do not collide in step.
            self._sleep(decision.wait + random.uniform(0, 0.005))

    def backoff(self, key: str, seconds: float) -> None:
        """Stora answered 429 for ``key``: pause every caller for ``seconds`` (+ margin).

        With ``scope="application"`` every key pauses. Never shortens a pause already
        armed; clamps to ``max_cooldown``.
        """
        pause = min(max(seconds, 0.0), self.max_cooldown) + self.margin
        target = self.global_cooldown_key if self.scope == "application" \
            else self.cooldown_key(key)
        self._backoff(keys=[target], args=[max(1, math.ceil(pause * 1000))])
        log.warning("stora.rate_limited", extra={
            "limiter_key": key, "cooldown_s": round(pause, 3), "scope": self.scope})


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimitSettings:
    """The limiter's environment settings, all optional.

    ==================================  =====================================  =========
    variable                            meaning                                default
    ==================================  =====================================  =========
    ``STORA_RATE_PER_SECOND``           per-key calls per second               10
    ``STORA_RATE_PER_MINUTE``           per-key calls per minute               60
    ``STORA_GLOBAL_RATE_PER_SECOND``    all keys together per second           off
    ``STORA_GLOBAL_RATE_PER_MINUTE``    all keys together per minute           off
    ``STORA_RATE_TOKEN_RESERVE``        share of the global budget kept for    0.1
                                        token-endpoint calls
    ``STORA_RATE_MARGIN_MS``            extra length of every window           100
    ``STORA_RATE_MAX_WAIT``             seconds a worker may sleep in-process  2.0
    ``STORA_RATE_LIMIT_SCOPE``          ``operator`` (a 429 pauses its key) or operator
                                        ``application`` (a 429 pauses all)
    ==================================  =====================================  =========
    """

    per_second: int = 10
    per_minute: int = 60
    global_per_second: int | None = None
    global_per_minute: int | None = None
    token_reserve: float = 0.1
    margin_ms: int = 100
    max_wait: float = 2.0
    scope: str = "operator"

    @classmethod
    def parse(cls, environ: Mapping[str, str]) -> tuple[RateLimitSettings, list[str]]:
        """Read the variables; return the settings and one line per bad variable
        (defaults stand in for bad values), to merge into ``ConfigError``."""
        problems: list[str] = []

        def read(name: str, default, cast, low, high):
            return number(environ, name, default, problems, cast=cast, low=low, high=high)

        scope = environ.get("STORA_RATE_LIMIT_SCOPE", "").strip().lower() or "operator"
        if scope not in SCOPES:
            problems.append(f"STORA_RATE_LIMIT_SCOPE must be one of {', '.join(SCOPES)}")
            scope = "operator"
        settings = cls(
            per_second=read("STORA_RATE_PER_SECOND", 10, int, 1, 10_000),
            per_minute=read("STORA_RATE_PER_MINUTE", 60, int, 1, 600_000),
            global_per_second=read("STORA_GLOBAL_RATE_PER_SECOND", None, int, 1, 100_000),
            global_per_minute=read("STORA_GLOBAL_RATE_PER_MINUTE", None, int, 1, 6_000_000),
            token_reserve=read("STORA_RATE_TOKEN_RESERVE", 0.1, float, 0.0, 0.5),
            margin_ms=read("STORA_RATE_MARGIN_MS", 100, int, 0, 5_000),
            max_wait=read("STORA_RATE_MAX_WAIT", 2.0, float, 0.0, 30.0),
            scope=scope,
        )
        return settings, problems

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RateLimitSettings:
        """Like :meth:`parse`; raises ValueError listing every bad variable."""
        settings, problems = cls.parse(os.environ if environ is None else environ)
        if problems:
            raise ValueError("; ".join(problems))
        return settings


def limiter_from_settings(settings: Any, redis: redis_lib.Redis) -> RedisRateLimiter:
    """A limiter configured from ``settings``.

    ``settings`` is a :class:`RateLimitSettings`, or an object carrying one as
    ``rate_limit`` (the app's ``Settings`` once it is wired in); anything else falls
    back to :meth:`RateLimitSettings.from_env` on the process environment.
    """
    if isinstance(settings, RateLimitSettings):
        config = settings
    else:
        nested = getattr(settings, "rate_limit", None)
        config = nested if isinstance(nested, RateLimitSettings) \
            else RateLimitSettings.from_env()
    return RedisRateLimiter(
        redis, per_second=config.per_second, per_minute=config.per_minute,
        global_per_second=config.global_per_second,
        global_per_minute=config.global_per_minute, token_reserve=config.token_reserve,
        margin=config.margin_ms / 1000, max_wait=config.max_wait, scope=config.scope)
