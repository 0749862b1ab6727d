"""Client-side pacing for remote services: token-bucket rate limits, backoff with jitter, Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any



@dataclass
class _Bucket:
    rate_per_s: float
    capacity: float
    level: float
    updated: float

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Debit `amount` now (the level may go negative) and return how long the debt takes to repay."""
        self._refill(now)
        self.level -= amount
        return max(0.0, -self.level / self.rate_per_s)

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


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
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._requests = self._bucket(requests_per_minute, now, "requests_per_minute")
        self._tokens = self._bucket(tokens_per_minute, now, "tokens_per_minute")

    @staticmethod
    def _bucket(per_minute: float | None, now: float, name: str) -> _Bucket | None:
        if per_minute is None:
            return None
        if per_minute <= 0:
            raise ValueError(f"{name} must be > 0 (or None for no limit), got {per_minute}")
        return _Bucket(per_minute / 60.0, per_minute, per_minute, now)

    def reserve(self, tokens: int = 0) -> float:
        """Book one request of `tokens` tokens; returns the seconds to wait before sending it."""
        now = self._clock()
        wait = 0.0
        if self._requests is not None:
            wait = max(wait, self._requests.take(1, now))
        if self._tokens is not None and tokens > 0:
            wait = max(wait, self._tokens.take(tokens, now))
        return wait

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Replace a reservation's token estimate by the real count (refund or extra debit)."""
        if self._tokens is None or actual_tokens == estimated_tokens:
            return
        now = self._clock()
        if actual_tokens < estimated_tokens:
            self._tokens.give(estimated_tokens - actual_tokens, now)
        else:
            self._tokens.take(actual_tokens - estimated_tokens, now)

    async def acquire(self, tokens: int = 0) -> float:
        wait = self.reserve(tokens)
        if wait > 0:
            await self._sleep(wait)
        return wait


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


