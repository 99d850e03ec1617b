"""Token-bucket arithmetic with a frozen, hand-moved clock (no sleeps), for both limiters:
the in-memory one (one process) and the SQLite one that server.workers > 1 shares across
processes; they must decide and report alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.errors import RateLimited
from appliance.gateway.ratelimit import Clock, RateLimiter, TokenBucket
from appliance.workers.limits import SqliteRateLimiter

MakeLimiter = Callable[[Clock], RateLimiter]


@pytest.fixture(params=["memory", "sqlite"])
def make_limiter(request: pytest.FixtureRequest, tmp_path: Path) -> MakeLimiter:
    if request.param == "memory":
        return RateLimiter
    return lambda clock: SqliteRateLimiter(tmp_path / "limits.db", clock)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_bucket_refills_at_limit_per_minute() -> None:
    b = TokenBucket(limit=60, level=0, updated=0)
    assert b.wait_for(1, now=0) == pytest.approx(1.0)  # 1 per second
    assert b.wait_for(30, now=10) == pytest.approx(20.0)
    b.refill(now=1000)
    assert b.level == 60  # capped at the limit


def test_burst_up_to_the_limit_then_refused_with_retry_after(make_limiter: MakeLimiter) -> None:
    clock = FakeClock()
    rl = make_limiter(clock)
    for _ in range(10):
        rl.admit_request("k", rpm=10, tpm=1000)
    with pytest.raises(RateLimited) as info:
        rl.admit_request("k", rpm=10, tpm=1000)
    assert info.value.retry_after == 6  # one request refills in 60/10 s
    assert info.value.headers["X-RateLimit-Remaining-Requests"] == "0"
    clock.advance(5.9)
    with pytest.raises(RateLimited):
        rl.admit_request("k", rpm=10, tpm=1000)
    clock.advance(0.2)
    state = rl.admit_request("k", rpm=10, tpm=1000)
    assert state.remaining_requests == 0


def test_tokens_are_charged_exactly_and_refused_beyond(make_limiter: MakeLimiter) -> None:
    clock = FakeClock()
    rl = make_limiter(clock)
    state = rl.admit_tokens("k", rpm=10, tpm=600, tokens=500)
    assert state.remaining_tokens == 100
    with pytest.raises(RateLimited) as info:
        rl.admit_tokens("k", rpm=10, tpm=600, tokens=150)
    assert info.value.retry_after == 5  # 50 missing tokens at 10 tokens/s
    clock.advance(5)
    assert rl.admit_tokens("k", rpm=10, tpm=600, tokens=150).remaining_tokens == 0


def test_a_request_bigger_than_the_limit_says_so(make_limiter: MakeLimiter) -> None:
    rl = make_limiter(FakeClock())
    with pytest.raises(RateLimited, match="split it"):
        rl.admit_tokens("k", rpm=10, tpm=100, tokens=101)


def test_keys_do_not_share_buckets(make_limiter: MakeLimiter) -> None:
    rl = make_limiter(FakeClock())
    rl.admit_request("a", rpm=1, tpm=10)
    rl.admit_request("b", rpm=1, tpm=10)
    with pytest.raises(RateLimited):
        rl.admit_request("a", rpm=1, tpm=10)


def test_reset_is_when_the_buckets_are_full_again(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(1000.0)
    rl = make_limiter(clock)
    rl.admit_request("k", rpm=60, tpm=60)
    state = rl.admit_tokens("k", rpm=60, tpm=60, tokens=30)
    assert state.reset == 1030  # 30 tokens at 1 token/s
    assert state.headers()["X-RateLimit-Limit-Tokens"] == "60"


def test_settling_gives_back_and_charges(make_limiter: MakeLimiter) -> None:
    rl = make_limiter(FakeClock())
    rl.admit_tokens("k", rpm=10, tpm=100, tokens=50)
    rl.settle_tokens("k", 100, -20)
    assert rl.state("k", 10, 100).remaining_tokens == 70
    rl.settle_tokens("k", 100, 30)
    assert rl.state("k", 10, 100).remaining_tokens == 40


def test_a_lowered_limit_applies_at_once(make_limiter: MakeLimiter) -> None:
    rl = make_limiter(FakeClock())
    rl.admit_request("k", rpm=100, tpm=10)
    state = rl.admit_request("k", rpm=5, tpm=10)
    assert state.limit_requests == 5 and state.remaining_requests == 4


def test_sqlite_buckets_are_shared_by_every_limiter_on_the_file(tmp_path: Path) -> None:
    """Two limiters on one file stand for two worker processes: they draw from one bucket."""
    clock = FakeClock()
    one = SqliteRateLimiter(tmp_path / "limits.db", clock)
    two = SqliteRateLimiter(tmp_path / "limits.db", clock)
    for _ in range(3):
        one.admit_request("k", rpm=6, tpm=100)
        two.admit_request("k", rpm=6, tpm=100)
    with pytest.raises(RateLimited):
        one.admit_request("k", rpm=6, tpm=100)
    two.settle_tokens("k", 100, 40)
    assert one.state("k", 6, 100).remaining_tokens == 60


def test_a_charge_refused_for_its_tokens_still_takes_its_request(
    make_limiter: MakeLimiter,
) -> None:
    rl = make_limiter(FakeClock())
    with pytest.raises(RateLimited, match="tokens"):
        asyncio.run(rl.aadmit_charge("k", 5, 100, 80, ["a"], [30]))
    state, blobs, charged = asyncio.run(rl.aadmit_charge("k", 5, 100, 60, ["a"], [10]))
    assert (state.remaining_requests, state.remaining_tokens) == (3, 30)
    assert blobs == [None] and charged == 70
