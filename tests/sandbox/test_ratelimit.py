"""Opt-in API rate limits: fixed windows per key, 429 with RateLimit-* headers."""

from __future__ import annotations

import pytest

from tests.sandbox.support import START, FakeClock, OAuth


@pytest.fixture
def clock_at_minute_start(clock: FakeClock) -> FakeClock:
    clock.now = (START // 60) * 60 + 0.25
    return clock


def statuses(oauth: OAuth, token: str, n: int) -> list[int]:
    return [oauth.api("/sites", token).status_code for _ in range(n)]


def test_off_by_default(oauth: OAuth) -> None:
    token = oauth.connect()["access_token"]
    assert set(statuses(oauth, token, 30)) == {200}


def test_per_second_and_per_minute_limits(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    clock = clock_at_minute_start
    oauth.patch_config(rate_limit_per_second=2, rate_limit_per_minute=5)
    token = oauth.connect()["access_token"]
    assert statuses(oauth, token, 3) == [200, 200, 429]
    throttled = oauth.api("/sites", token)
    assert throttled.status_code == 429
    assert throttled.get_json()["error"]["code"] == "too_many_requests"
    assert throttled.headers["RateLimit-Limit"] == "2"
    assert throttled.headers["RateLimit-Reset"] == str(int(clock.now) + 1)
    assert "Retry-After" not in throttled.headers

    clock.advance(1)
    assert statuses(oauth, token, 2) == [200, 429]  # 5 per minute, throttled ones count
    clock.advance(1)
    minute = oauth.api("/sites", token)
    assert minute.status_code == 429
    assert minute.headers["RateLimit-Limit"] == "5"
    assert minute.headers["RateLimit-Reset"] == str(int(clock.now // 60 + 1) * 60)
    clock.now = (clock.now // 60 + 1) * 60
    assert statuses(oauth, token, 1) == [200]


def test_retry_after_switch(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    oauth.patch_config(rate_limit_per_minute=1, rate_limit_retry_after=True)
    token = oauth.connect()["access_token"]
    assert statuses(oauth, token, 1) == [200]
    assert oauth.api("/sites", token).headers["Retry-After"] == "60"


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


def test_oauth_endpoints_are_not_limited(oauth: OAuth, clock_at_minute_start: FakeClock) -> None:
    oauth.patch_config(rate_limit_per_second=1)
    tokens = oauth.connect()
    for _ in range(3):
        tokens = oauth.refresh(tokens["refresh_token"]).get_json()
    assert "access_token" in tokens
