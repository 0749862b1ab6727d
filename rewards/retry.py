"""Client-side pacing for remote services: token-bucket rate limits, backoff with jitter, Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any


class TokenBucket:
    """`rate` per second with room for `burst`; `take` says how long to wait, never sleeps.

    A reservation is debited at once (the level may go negative), so concurrent callers queue up
    in reservation order without a lock, each waiting one interval longer than the one before,
    and a request larger than the bucket still goes through once its debt is repaid.
    """

    def __init__(self, rate: float, burst: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if burst <= 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = burst
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._updated) * self.rate)
        self._updated = now

    def take(self, amount: float = 1.0) -> float:
        """Debit `amount` now; the seconds until the debt is repaid (0.0 when the bucket held enough)."""
        self._refill()
        self._level -= amount
        return max(0.0, -self._level / self.rate)

    def reserve(self) -> float:
        """Take one token; the seconds to wait before using it."""
        return self.take(1.0)

    def give(self, amount: float) -> None:
        self._refill()
        self._level = min(self.burst, self._level + amount)

    def is_full(self) -> bool:
        self._refill()
        return self._level >= self.burst


class RateLimiter:
    """Token buckets for requests/min and tokens/min, each holding at most one minute of budget.

    A reservation is debited at once and returns how long to wait, so concurrent callers
    queue in reservation order without a lock, and a request larger than the bucket still
    goes through once its debt is repaid. Token counts are estimates before the call;
    `settle` corrects the bucket with the count the reply reports.
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ):
        self._sleep = sleep
        self._requests = self._bucket(requests_per_minute, clock, "requests_per_minute")
        self._tokens = self._bucket(tokens_per_minute, clock, "tokens_per_minute")

    @staticmethod
    def _bucket(per_minute: float | None, clock: Callable[[], float], name: str) -> TokenBucket | None:
        if per_minute is None:
            return None
        if per_minute <= 0:
            raise ValueError(f"{name} must be > 0 (or None for no limit), got {per_minute}")
        return TokenBucket(per_minute / 60.0, per_minute, clock)

    def reserve(self, tokens: int = 0) -> float:
        """Book one request of `tokens` tokens; returns the seconds to wait before sending it."""
        wait = 0.0
        if self._requests is not None:
            wait = max(wait, self._requests.take(1))
        if self._tokens is not None and tokens > 0:
            wait = max(wait, self._tokens.take(tokens))
        return wait

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Replace a reservation's token estimate by the real count (refund or extra debit)."""
        if self._tokens is None or actual_tokens == estimated_tokens:
            return
        if actual_tokens < estimated_tokens:
            self._tokens.give(estimated_tokens - actual_tokens)
        else:
            self._tokens.take(actual_tokens - estimated_tokens)

    async def acquire(self, tokens: int = 0) -> float:
        wait = self.reserve(tokens)
        if wait > 0:
            await self._sleep(wait)
        return wait


class KeyedRateLimiter:
    """A bucket per key (one key for search, one per host for page fetches); rate None means no limit.

    Each bucket allows a burst of one second's worth of requests (at least one), then `rate` per second.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, max_keys: int = 4096):
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    async def acquire(self, key: str = "") -> None:
        if self.rate is None:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                # Full buckets carry no state worth keeping: a fresh bucket starts full anyway.
                self._buckets = {k: b for k, b in self._buckets.items() if not b.is_full()}
            bucket = self._buckets[key] = TokenBucket(self.rate, max(1.0, self.rate), self._clock)
        wait = bucket.reserve()
        if wait > 0:
            await self._sleep(wait)


def estimate_tokens(messages: Sequence[Mapping[str, str]], max_tokens: int) -> int:
    """A rough upper bound before the call: ~4 characters per prompt token, plus the reply budget."""
    return math.ceil(sum(len(m["content"]) for m in messages) / 4) + max_tokens


def parse_retry_after(headers: Mapping[str, str] | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from retry-after-ms, or Retry-After (seconds, fractional accepted, or an HTTP date)."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        if "retry-after" in lower:
            raw = lower["retry-after"].strip()
            try:
                return max(0.0, float(raw))
            except ValueError:
                date = email.utils.parsedate_to_datetime(raw)
                return max(0.0, date.timestamp() - now())
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def retry_delay(
    retry: int,
    *,
    base_s: float,
    max_s: float,
    jitter: bool,
    retry_after_s: float | None = None,
    retry_after_max_s: float = 60.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Wait before retry number `retry` (0 = first retry): base·2^retry capped at max_s.

    Jitter keeps between half and all of that ("equal jitter"), so that clients that failed
    together spread out but still back off. A Retry-After is a floor, capped at retry_after_max_s.
    """
    delay = min(max_s, base_s * (2.0**retry))
    if jitter:
        delay *= 0.5 + 0.5 * rand()
    if retry_after_s is not None:
        delay = min(max(delay, retry_after_s), max(retry_after_max_s, delay))
    return delay


