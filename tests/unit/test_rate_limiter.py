"""Token-bucket rate limiter, backoff and Retry-After parsing of the judge client, on a fake clock."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from rewards.retry import RateLimiter, estimate_tokens, parse_retry_after, retry_delay


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_no_limits_never_wait():
    limiter = RateLimiter(clock=FakeClock())
    assert all(limiter.reserve(10**6) == 0.0 for _ in range(1000))


def test_requests_per_minute_allow_a_minute_of_burst_then_pace():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, clock=clock)
    assert [limiter.reserve() for _ in range(60)] == [0.0] * 60
    # The bucket is empty; each further request books one more second of debt.
    assert limiter.reserve() == pytest.approx(1.0)
    assert limiter.reserve() == pytest.approx(2.0)
    clock.now += 2.0
    assert limiter.reserve() == pytest.approx(1.0)


def test_refill_is_capped_at_one_minute_of_budget():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=6, clock=clock)
    clock.now += 3600
    assert [limiter.reserve() for _ in range(6)] == [0.0] * 6
    assert limiter.reserve() == pytest.approx(10.0)


def test_tokens_per_minute_and_a_request_larger_than_the_bucket():
    clock = FakeClock()
    limiter = RateLimiter(tokens_per_minute=600, clock=clock)  # 10 tokens/s
    assert limiter.reserve(500) == 0.0
    assert limiter.reserve(200) == pytest.approx(10.0)  # 100 tokens of debt
    # Larger than the whole bucket: it goes through once the debt is repaid, never deadlocks.
    assert limiter.reserve(1000) == pytest.approx(110.0)


def test_the_stricter_limit_decides():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=60, clock=clock)
    assert limiter.reserve(60) == 0.0
    assert limiter.reserve(30) == pytest.approx(30.0)


def test_settle_refunds_an_overestimate_and_charges_an_underestimate():
    clock = FakeClock()
    limiter = RateLimiter(tokens_per_minute=600, clock=clock)
    limiter.reserve(600)
    limiter.settle(estimated_tokens=600, actual_tokens=100)  # 500 back
    assert limiter.reserve(500) == 0.0
    limiter.settle(estimated_tokens=500, actual_tokens=560)  # 60 more: 6 s of debt
    assert limiter.reserve(0) == 0.0  # zero tokens never waits on the token bucket
    assert limiter.reserve(10) == pytest.approx(7.0)


def test_acquire_sleeps_for_the_booked_wait_on_an_injected_clock():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, clock=clock, sleep=clock.sleep)

    async def burst() -> list[float]:
        return [await limiter.acquire() for _ in range(63)]

    waits = asyncio.run(burst())
    assert waits[:60] == [0.0] * 60
    # Each acquire sleeps (advancing the clock), so the next one finds its debt repaid.
    assert waits[60:] == pytest.approx([1.0, 1.0, 1.0])
    assert clock.slept == pytest.approx([1.0, 1.0, 1.0])


def test_acquire_really_waits_on_the_real_clock():
    limiter = RateLimiter(requests_per_minute=600)  # 10 per second after the burst: 100 ms apart

    async def go() -> float:
        for _ in range(600):
            limiter.reserve()
        start = time.monotonic()
        await limiter.acquire()
        return time.monotonic() - start

    # The burst takes well under 50 ms to reserve even on a loaded machine; the rest is waited.
    assert 0.05 <= asyncio.run(go()) < 1.0


def test_refuses_non_positive_limits():
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimiter(requests_per_minute=0)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        RateLimiter(tokens_per_minute=-5)


def test_estimate_tokens_counts_prompt_characters_and_the_reply_budget():
    assert estimate_tokens([{"role": "user", "content": "x" * 400}], 64) == 164


# ---------------------------------------------------------------- backoff and Retry-After


def test_backoff_doubles_up_to_the_cap_without_jitter():
    delays = [retry_delay(r, base_s=0.5, max_s=8.0, jitter=False) for r in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize("draw", [0.0, 0.3, 0.999])
def test_jitter_keeps_between_half_and_all_of_the_backoff(draw):
    delay = retry_delay(2, base_s=0.5, max_s=8.0, jitter=True, rand=lambda: draw)
    assert 1.0 <= delay <= 2.0
    assert delay == pytest.approx(2.0 * (0.5 + 0.5 * draw))


def test_retry_after_is_a_floor_capped_by_retry_after_max():
    assert retry_delay(0, base_s=0.5, max_s=8, jitter=False, retry_after_s=3.0) == 3.0
    assert retry_delay(3, base_s=0.5, max_s=8, jitter=False, retry_after_s=1.0) == 4.0
    assert retry_delay(0, base_s=0.5, max_s=8, jitter=False, retry_after_s=3600, retry_after_max_s=30) == 30.0


def test_parse_retry_after_forms():
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
    date = email.utils.format_datetime(email.utils.localtime().replace(microsecond=0), usegmt=False)
    then = email.utils.parsedate_to_datetime(date).timestamp()
    assert parse_retry_after({"Retry-After": date}, now=lambda: then - 5) == 5.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after(None) is None
    assert parse_retry_after({"Retry-After": "-3"}) == 0.0
