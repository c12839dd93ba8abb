"""Rate limits: on by default (10/s, 60/min per access token), 429 envelope and headers,
window boundaries, keys, the token-endpoint switch, and checks made from the request log
alone, as a conformance harness would make them."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest

from tests.sandbox.support import (
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    START,
    FakeClock,
    OAuth,
    admin,
    bearer,
)

MINUTE_START = (START // 60) * 60


@pytest.fixture
def clock_at_minute_start(clock: FakeClock) -> FakeClock:
    clock.now = MINUTE_START + 0.25
    return clock


def statuses(oauth: OAuth, token: str, n: int) -> list[int]:
    return [oauth.api("/sites", token).status_code for _ in range(n)]


def test_on_by_default_ten_per_second_per_token(
    oauth: OAuth, clock_at_minute_start: FakeClock
) -> None:
    clock = clock_at_minute_start
    token = oauth.connect()["access_token"]
    other = oauth.connect()["access_token"]  # same operator and application
    assert statuses(oauth, token, 12) == [200] * 10 + [429] * 2
    throttled = oauth.api("/sites", token)
    assert throttled.status_code == 429
    error = throttled.get_json()["error"]
    assert (error["code"], error["type"]) == ("too_many_requests", "invalid_request_error")
    assert error["message"].startswith("Rate Limit Exceeded.")
    assert error["request_id"] == throttled.headers["X-Request-Id"]
    assert throttled.headers["RateLimit-Limit"] == "10"
    assert throttled.headers["RateLimit-Reset"] == str(math.floor(clock.now) + 1)
    assert "Retry-After" not in throttled.headers
    assert statuses(oauth, other, 10) == [200] * 10  # each token has its own budget
    clock.advance(1)
    assert statuses(oauth, token, 1) == [200]


def test_sixty_per_minute_and_throttled_requests_count(
    oauth: OAuth, clock_at_minute_start: FakeClock
) -> None:
    clock = clock_at_minute_start
    token = oauth.connect()["access_token"]
    for _second in range(5):
        assert statuses(oauth, token, 10) == [200] * 10
        clock.advance(1)
    # 50 so far; 12 more in this second: 10 admitted, 2 throttled, and all 12 count.
    assert statuses(oauth, token, 12) == [200] * 10 + [429] * 2
    clock.advance(1)
    minute = oauth.api("/sites", token)
    assert minute.status_code == 429
    assert minute.headers["RateLimit-Limit"] == "60"
    assert minute.headers["RateLimit-Reset"] == str(int(MINUTE_START) + 60)
    clock.now = MINUTE_START + 60  # the next clock minute starts a new window
    assert statuses(oauth, token, 1) == [200]


def test_fixed_windows_admit_a_burst_across_a_boundary(oauth: OAuth, clock: FakeClock) -> None:
    token = oauth.connect()["access_token"]
    clock.now = MINUTE_START + 10.95
    assert statuses(oauth, token, 10) == [200] * 10
    clock.now = MINUTE_START + 11.0
    assert statuses(oauth, token, 10) == [200] * 10  # 20 within 50 ms: two windows


def test_custom_limits(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    clock = clock_at_minute_start
    oauth.patch_config(rate_limit_per_second=2, rate_limit_per_minute=5)
    token = oauth.connect()["access_token"]
    assert statuses(oauth, token, 3) == [200, 200, 429]
    throttled = oauth.api("/sites", token)
    assert throttled.headers["RateLimit-Limit"] == "2"
    assert throttled.headers["RateLimit-Reset"] == str(int(clock.now) + 1)
    clock.advance(1)
    assert statuses(oauth, token, 2) == [200, 429]  # 5 per minute, throttled ones count
    clock.advance(1)
    minute = oauth.api("/sites", token)
    assert minute.status_code == 429
    assert minute.headers["RateLimit-Limit"] == "5"
    assert minute.headers["RateLimit-Reset"] == str(int(MINUTE_START) + 60)


def test_retry_after_switch(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    oauth.patch_config(rate_limit_per_minute=1, rate_limit_retry_after=True)
    token = oauth.connect()["access_token"]
    assert statuses(oauth, token, 1) == [200]
    assert oauth.api("/sites", token).headers["Retry-After"] == "60"


def test_headers_on_success_switch(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    token = oauth.connect()["access_token"]
    assert "RateLimit-Limit" not in oauth.api("/sites", token).headers
    oauth.patch_config(rate_limit_headers_on_success=True)
    ok = oauth.api("/sites", token)
    assert ok.status_code == 200
    # The limit with the fewest requests left: the per-second one (8 left of 10).
    assert ok.headers["RateLimit-Limit"] == "10"
    assert ok.headers["RateLimit-Reset"] == str(int(MINUTE_START) + 1)


def test_limits_can_be_turned_off(oauth: OAuth) -> None:
    oauth.patch_config(rate_limit_per_second=0, rate_limit_per_minute=0)
    token = oauth.connect()["access_token"]
    assert set(statuses(oauth, token, 80)) == {200}


@pytest.mark.parametrize(
    ("key", "same_operator", "other_operator"),
    [("operator", 429, 200), ("token", 200, 200), ("application", 429, 429)],
)
def test_rate_limit_key(
    oauth: OAuth,
    clock_at_minute_start: FakeClock,
    key: str,
    same_operator: int,
    other_operator: int,
) -> None:
    oauth.patch_config(rate_limit_per_minute=1, rate_limit_key=key)
    first = oauth.connect(operator_id=oauth.operator_id("Leeds"))["access_token"]
    second = oauth.connect(operator_id=oauth.operator_id("Leeds"))["access_token"]
    other = oauth.connect(operator_id=oauth.operator_id("Bristol"))["access_token"]
    assert statuses(oauth, first, 1) == [200]
    assert statuses(oauth, second, 1) == [same_operator]
    assert statuses(oauth, other, 1) == [other_operator]


def test_token_info_shares_the_token_budget(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    token = oauth.connect()["access_token"]
    assert statuses(oauth, token, 9) == [200] * 9
    assert oauth.client.get("/oauth2/token/info", headers=bearer(token)).status_code == 200
    info = oauth.client.get("/oauth2/token/info", headers=bearer(token))
    assert info.status_code == 429
    assert info.get_json()["error"]["code"] == "too_many_requests"
    assert info.headers["RateLimit-Limit"] == "10"


def test_token_endpoint_is_not_limited_by_default(
    oauth: OAuth, clock_at_minute_start: FakeClock
) -> None:
    oauth.patch_config(rate_limit_per_second=1)
    tokens = oauth.connect()
    for _ in range(3):
        tokens = oauth.refresh(tokens["refresh_token"]).get_json()
    assert "access_token" in tokens


def test_token_endpoint_switch_counts_per_client(
    oauth: OAuth, clock_at_minute_start: FakeClock
) -> None:
    tokens = oauth.connect()  # one token request
    oauth.patch_config(rate_limit_per_second=2, rate_limit_token_endpoint=True)
    first = oauth.refresh(tokens["refresh_token"])
    assert first.status_code == 200
    second = oauth.refresh(first.get_json()["refresh_token"])
    assert second.status_code == 200
    third = oauth.refresh(second.get_json()["refresh_token"])
    assert third.status_code == 429
    assert third.get_json()["error"]["code"] == "too_many_requests"
    assert third.headers["RateLimit-Limit"] == "2"
    # Another client has its own bucket (its credentials fail, but it is not throttled).
    other = oauth.client.post(
        "/oauth2/token",
        json={
            "grant_type": "refresh_token",
            "refresh_token": "x",
            "client_id": OTHER_CLIENT_ID,
            "client_secret": OTHER_CLIENT_SECRET,
        },
    )
    assert other.status_code == 400
    log = admin(oauth, "GET", "requests")["requests"]
    assert log[-2]["rate_limit_key"] == "client:sandbox-test-client"
    assert log[-2]["throttled"] is True


def test_request_log_records_throttling(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    token = oauth.connect()["access_token"]
    row_id = admin(oauth, "GET", "tokens")["tokens"][-2]["row_id"]
    admin(oauth, "POST", "faults", 201, json={"endpoint": "api", "status": 429})
    statuses(oauth, token, 12)
    api = [e for e in admin(oauth, "GET", "requests")["requests"] if e["endpoint"] == "api"]
    assert [e["status"] for e in api] == [429] + [200] * 9 + [429, 429]
    # The first 429 was injected by a fault; the limiter's are marked as throttled.
    assert [e["throttled"] for e in api] == [False] * 10 + [True, True]
    assert {e["rate_limit_key"] for e in api} == {f"token:{row_id}"}
    assert all(e["operator_id"] == oauth.operator_id() for e in api)
    assert all(e["client_id"] == "sandbox-test-client" for e in api)
    assert all(e["at"] == clock_at_minute_start.now for e in api)


def test_throttled_requests_consume_no_fault(
    oauth: OAuth, clock_at_minute_start: FakeClock
) -> None:
    oauth.patch_config(rate_limit_per_second=1)
    token = oauth.connect()["access_token"]
    assert statuses(oauth, token, 1) == [200]
    admin(oauth, "POST", "faults", 201, json={"endpoint": "api", "status": 503})
    assert statuses(oauth, token, 1) == [429]
    clock_at_minute_start.advance(1)
    assert statuses(oauth, token, 1) == [503]


def test_sliding_window_is_strict_and_resets_per_oldest_request(
    oauth: OAuth, clock: FakeClock
) -> None:
    oauth.patch_config(
        rate_limit_window="sliding",
        rate_limit_per_second=0,
        rate_limit_per_minute=2,
        rate_limit_retry_after=True,
    )
    token = oauth.connect()["access_token"]
    base = MINUTE_START + 20.5
    clock.now = base
    assert statuses(oauth, token, 1) == [200]
    clock.now = base + 30
    assert statuses(oauth, token, 1) == [200]
    clock.now = MINUTE_START + 60.1  # a new clock minute, but the window still holds 2
    throttled = oauth.api("/sites", token)
    assert throttled.status_code == 429
    assert throttled.headers["RateLimit-Reset"] == str(math.ceil(base + 60))
    assert throttled.headers["Retry-After"] == str(math.ceil(base + 60 - clock.now))
    clock.now = base + 60  # the first request has left (t - 60, t]
    assert statuses(oauth, token, 1) == [200]
    assert statuses(oauth, token, 1) == [429]  # only admitted requests count


# -- checks a harness can make from the request log alone --------------------------------

LIMITS = {1: 3, 60: 10}


def _drive_random_traffic(oauth: OAuth, clock: FakeClock) -> None:
    rng = random.Random(20251014)
    tokens = [oauth.connect()["access_token"] for _ in range(3)]
    admin(oauth, "DELETE", "requests")
    clock.now = MINUTE_START + 0.5
    for _ in range(400):
        clock.advance(rng.choice([0, 0, 0.01, 0.05, 0.2, 0.6, 1.0, 4.0, 13.0]))
        oauth.api("/sites", rng.choice(tokens))


def _api_log(oauth: OAuth) -> list[dict]:
    entries = admin(oauth, "GET", "requests")["requests"]
    return sorted((e for e in entries if e["endpoint"] == "api"), key=lambda e: e["seq"])


def test_fixed_windows_are_exact_from_the_log(oauth: OAuth, clock: FakeClock) -> None:
    oauth.patch_config(rate_limit_per_second=LIMITS[1], rate_limit_per_minute=LIMITS[60])
    _drive_random_traffic(oauth, clock)
    log = _api_log(oauth)
    counts: dict[tuple[str, int, int], int] = defaultdict(int)
    admitted: dict[tuple[str, int, int], int] = defaultdict(int)
    for entry in log:
        over = False
        for period, limit in LIMITS.items():
            window = (entry["rate_limit_key"], period, math.floor(entry["at"] / period))
            counts[window] += 1  # every request counts, throttled or not
            over = over or counts[window] > limit
        assert entry["status"] == (429 if over else 200), entry
        assert entry["throttled"] is over
        if not over:
            for period in LIMITS:
                admitted[(entry["rate_limit_key"], period, math.floor(entry["at"] / period))] += 1
    assert all(n <= LIMITS[window[1]] for window, n in admitted.items())
    assert sum(e["throttled"] for e in log) > 50  # the traffic really was throttled
    assert len({e["rate_limit_key"] for e in log}) == 3


def test_sliding_windows_are_exact_from_the_log(oauth: OAuth, clock: FakeClock) -> None:
    oauth.patch_config(
        rate_limit_window="sliding",
        rate_limit_per_second=LIMITS[1],
        rate_limit_per_minute=LIMITS[60],
    )
    _drive_random_traffic(oauth, clock)
    log = _api_log(oauth)
    admitted: dict[str, list[float]] = defaultdict(list)
    for entry in log:
        times = admitted[entry["rate_limit_key"]]
        at = entry["at"]
        allowed = all(
            sum(1 for t in times if at - period < t <= at) < limit
            for period, limit in LIMITS.items()
        )
        assert entry["status"] == (200 if allowed else 429), entry
        if allowed:
            times.append(at)
    # No interval [s, s + W) ever holds more than N admitted requests of one key.
    for times in admitted.values():
        for i, start in enumerate(times):
            for period, limit in LIMITS.items():
                assert sum(1 for t in times[i:] if t < start + period) <= limit
    assert sum(e["throttled"] for e in log) > 50
