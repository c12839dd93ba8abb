"""Rate limiting: Stora's documented 10 requests per second and 60 per minute.

Stora answers an exceeded limit with 429 ``too_many_requests`` and the headers
``RateLimit-Limit`` and ``RateLimit-Reset`` (UTC epoch seconds)
(shared/stora-api/api-conventions.md §7). What the limit is keyed on and the window
algorithm are not documented; :mod:`stora_sandbox.hooks` picks the key (switch
``rate_limit_key``), this module counts.

Two window models (switch ``rate_limit_window``); ``t`` is the sandbox clock reading
taken under the limiter's lock, which is also the request log's ``at`` for the request:

``"fixed"`` (default; what a Rails app using Rack::Attack throttles does, **inferred**)
    Windows are aligned to the epoch: second windows are ``[n, n + 1)`` and minute
    windows ``[60n, 60n + 60)``, i.e. they start on whole clock minutes, not at a
    client's first request. Every request that reaches the limiter, throttled or not,
    increments the counter of each window it falls into; it is throttled when any counter
    is then above its limit. So the admitted requests of a key in one window never exceed
    the limit, a client that keeps calling while throttled uses up its minute budget,
    and up to twice the limit can be admitted across a window boundary (N at the end of
    one window, N at the start of the next). ``RateLimit-Reset`` is the end of the window.

``"sliding"`` (strict)
    Only admitted requests count. A request at ``t`` is admitted when, for every limit
    ``(N, W)``, fewer than ``N`` admitted requests of the key have times in
    ``(t - W, t]``; hence no interval ``[s, s + W)`` ever holds more than ``N`` admitted
    requests. ``RateLimit-Reset`` is ``ceil(oldest + W)`` for the oldest admitted request
    still inside the window, the first whole second at which a retry can succeed.

A limit of 0 disables that period. Limits are checked together: with ``"sliding"``, a
request that one limit refuses is counted by none.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Limit = tuple[int, int]  # (requests allowed, period in seconds)


@dataclass(frozen=True)
class Decision:
    """The limiter's answer for one request.

    Attributes:
        at: the clock reading the decision was made at.
        allowed: False means answer 429.
        limit: the limit to report in ``RateLimit-Limit``: when throttled, the exceeded
            limit that ends last; otherwise the one with the fewest requests left (ties:
            the longer period). None when every limit is 0.
        period: that limit's period in seconds.
        reset_at: ``RateLimit-Reset`` for that limit, epoch seconds.
        counts: per period, requests of the key counted in its current window after this
            one (fixed) or admitted in the trailing window (sliding).
    """

    at: float
    allowed: bool
    limit: int | None = None
    period: int | None = None
    reset_at: int | None = None
    counts: dict[int, int] = field(default_factory=dict)


class RateLimiter:
    """Counts requests per key under both window models; thread-safe.

    Keys are opaque labels chosen by the caller; they must not contain secrets.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fixed: dict[tuple[str, int, int], int] = {}
        self._sliding: dict[tuple[str, int], list[float]] = {}

    def hit(
        self,
        key: str,
        clock: Callable[[], float],
        limits: Sequence[Limit],
        window: str = "fixed",
    ) -> Decision:
        """Count one request for ``key`` now (``clock()`` read under the lock)."""
        active = [(limit, period) for limit, period in limits if limit > 0]
        with self._lock:
            now = clock()
            if not active:
                return Decision(at=now, allowed=True)
            if window == "sliding":
                decision = self._hit_sliding(key, now, active)
            else:
                decision = self._hit_fixed(key, now, active)
            self._prune(now)
            return decision

    def _hit_fixed(self, key: str, now: float, limits: list[Limit]) -> Decision:
        counts: dict[int, int] = {}
        states = []
        for limit, period in limits:
            window = math.floor(now / period)
            slot = (key, period, window)
            count = self._fixed.get(slot, 0) + 1
            self._fixed[slot] = count
            counts[period] = count
            states.append((limit, period, count, (window + 1) * period))
        exceeded = [s for s in states if s[2] > s[0]]
        if exceeded:
            limit, period, _count, reset_at = max(exceeded, key=lambda s: (s[3], s[1]))
            return Decision(now, False, limit, period, reset_at, counts)
        limit, period, _count, reset_at = min(states, key=lambda s: (s[0] - s[2], -s[1]))
        return Decision(now, True, limit, period, reset_at, counts)

    def _hit_sliding(self, key: str, now: float, limits: list[Limit]) -> Decision:
        states = []
        for limit, period in limits:
            times = self._sliding.setdefault((key, period), [])
            # Drop admissions at or before now - period; they are outside (now - W, now].
            del times[: bisect.bisect_right(times, now - period)]
            inside = times[: bisect.bisect_right(times, now)]
            oldest = inside[0] if inside else now
            states.append((limit, period, len(inside), math.ceil(oldest + period), times))
        exceeded = [s for s in states if s[2] >= s[0]]
        counts = {s[1]: s[2] for s in states}
        if exceeded:
            limit, period, _count, reset_at, _times = max(exceeded, key=lambda s: (s[3], s[1]))
            return Decision(now, False, limit, period, reset_at, counts)
        for state in states:
            bisect.insort(state[4], now)
            counts[state[1]] += 1
        limit, period, _count, _reset, times = min(
            states, key=lambda s: (s[0] - counts[s[1]], -s[1])
        )
        reset_at = math.ceil(times[0] + period)
        return Decision(now, True, limit, period, reset_at, counts)

    def _prune(self, now: float) -> None:
        """Forget ended windows once the tables grow, so memory stays bounded."""
        if len(self._fixed) >= 10_000:
            self._fixed = {
                slot: count for slot, count in self._fixed.items() if (slot[2] + 1) * slot[1] > now
            }
        if len(self._sliding) >= 10_000:
            self._sliding = {
                slot: times
                for slot, times in self._sliding.items()
                if times and times[-1] > now - slot[1]
            }

    def clear(self) -> None:
        """Forget every count."""
        with self._lock:
            self._fixed.clear()
            self._sliding.clear()
