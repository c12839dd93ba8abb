"""Opt-in API rate limiting, off unless a ``rate_limit_*`` switch is set.

Stora documents 10 requests per second and 60 per minute, answered with 429
``too_many_requests`` and the headers ``RateLimit-Limit`` and ``RateLimit-Reset`` (epoch
seconds) (shared/stora-api/api-conventions.md §7). What the limit is keyed on, and the
window algorithm, are not documented; this uses fixed windows aligned to the epoch, as a
Rails app using Rack::Attack throttles would (**inferred**), keyed per the
``rate_limit_key`` switch. Throttled requests still count, as in Rack::Attack.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Throttled:
    """The limit that was exceeded and when its window ends (epoch seconds)."""

    limit: int
    period: int
    reset_at: int


class FixedWindowLimiter:
    """Counts hits per key and window; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, int, int], int] = {}

    def hit(self, key: str, now: float, limits: list[tuple[int, int]]) -> Throttled | None:
        """Record one request for ``key``; return the first exceeded ``(limit, period)``.

        A limit of 0 means "no limit" for that period.
        """
        # Keys may be bearer tokens; keep only a digest so no token value is held here.
        digest = hashlib.sha256(key.encode()).hexdigest()
        throttled: Throttled | None = None
        with self._lock:
            for limit, period in limits:
                if limit <= 0:
                    continue
                window = int(now // period)
                slot = (digest, period, window)
                count = self._counts.get(slot, 0) + 1
                self._counts[slot] = count
                if count > limit and throttled is None:
                    throttled = Throttled(limit, period, (window + 1) * period)
            self._prune(now)
        return throttled

    def _prune(self, now: float) -> None:
        """Forget windows that have ended, so memory stays bounded."""
        if len(self._counts) < 10_000:
            return
        self._counts = {
            slot: count for slot, count in self._counts.items() if (slot[2] + 1) * slot[1] > now
        }

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
