"""LLM judge over any OpenAI-compatible endpoint: answer verdicts and stage-2 step labels.

One HTTP call judges one answer, and one call labels a whole trajectory (the labels of later
calls depend on earlier ones, so they are judged together). Replies must be JSON that
validates; anything else is retried like a transport error, with exponential backoff and
jitter, and after the last retry the caller's rule-based path answers instead (docs/rapo.md §2.4:
judge failures fall back and are counted, never silently scored 0). Identical judgements
are served from a cache, or shared with an identical one in flight, so they are paid once.

The prompts embed the case as a fenced JSON block, so that a test server (and any log
reader) can parse the case back exactly; the instructions around it are prose for the model.
"""


from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from rewards.answer import rule_judge
from rewards.cache import Cache, GuardedCache, RedisCache
from rewards.judge_prompts import (
    ANSWER_TASK,
    LABELS_TASK,
    Message,
    ReplyError,
    Verdict,
    answer_prompt,
    as_golds,
    clip_text,
    labels_prompt,
    parse_answer_reply,
    parse_labels_reply,
)
from rewards.labeller import rule_labels
from rewards.retry import RateLimiter, estimate_tokens, parse_retry_after, retry_delay
from rewards.secrets import read_secret
from rollout.types import ToolCall

log = logging.getLogger(__name__)
class JudgeConfigError(ValueError):
    """The judge cannot be set up as configured; the message says what to change."""


class JudgeUnavailableError(RuntimeError):
    """Every attempt failed and no fallback was given."""


# --------------------------------------------------------------------------------------------
# Settings and the API key


class JudgeSettings(BaseModel):
    """Where the judge lives and how hard to push it. Holds no secret: the key is read at client creation."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    base_url: str
    # "judge" is the name `rapo serve-judge` serves its model under.
    model: str = Field("judge", min_length=1)
    api_key_env: str = "RAPO_JUDGE_API_KEY"
    # When set, the key is read from this file (first line) and the environment is not consulted.
    api_key_file: Path | None = None
    # False for servers without authentication (a local vLLM): the client then sends a placeholder key.
    require_api_key: bool = True
    timeout_s: float = Field(20.0, gt=0)
    max_retries: int = Field(3, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(8.0, ge=0)
    jitter: bool = True
    # A Retry-After longer than this is cut short: a training step should fall back, not stall.
    retry_after_max_s: float = Field(60.0, ge=0)
    max_in_flight: int = Field(16, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, ge=1)
    # Sends response_format={"type": "json_object"}; off by default because not every
    # OpenAI-compatible server accepts it (a 400 would turn every judgement into a fallback).
    json_mode: bool = False
    # How much of each tool result the labeller sees: enough to judge overlap, cheap in tokens.
    result_chars: int = Field(300, ge=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url must be an http(s) URL such as https://api.openai.com/v1, got {value!r}")
        return value.rstrip("/")


def load_api_key(settings: JudgeSettings) -> SecretStr | None:
    """The judge's API key from settings.api_key_file, else from the settings.api_key_env variable."""
    key = read_secret(
        "judge API key", file=settings.api_key_file, file_setting="api_key_file", env=settings.api_key_env,
        required=settings.require_api_key, error=JudgeConfigError,
        optional_hint="set require_api_key=false for a judge server without authentication",
    )
    return None if key is None else SecretStr(key)


# --------------------------------------------------------------------------------------------
# Cache


JudgeCache = Cache[dict[str, Any]]


def judgement_key(kind: str, model: str, messages: Sequence[Message]) -> str:
    """sha256 over what decides a judgement: its kind, the judge model and the exact prompt."""
    payload = json.dumps(
        {"kind": kind, "model": model, "messages": list(messages)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class RedisJudgeCache(RedisCache):
    """Judgements as JSON under `{namespace}:judge:{key}` in Redis, optionally expiring."""

    def __init__(self, redis: Any, namespace: str, ttl_s: float | None = None):
        if not namespace:
            raise ValueError(
                "RedisJudgeCache needs a namespace (e.g. the run id) so that runs do not share keys by accident"
            )
        super().__init__(redis, f"{namespace}:judge", ttl_s)

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await super().get(key)
        return None if raw is None else json.loads(raw)

    async def set(self, key: str, value: dict[str, Any]) -> None:
        await super().set(key, json.dumps(value, separators=(",", ":")))


# --------------------------------------------------------------------------------------------
# Outcomes and counters

FAILURE_REASONS = ("http_429", "http_5xx", "http_4xx", "timeout", "connection", "invalid_reply", "wrong_label_count")


@dataclass
class JudgeStats:
    """Everything the judge did, for metrics: RewardPool.stats sums these over the reward-labeller actors."""

    answer_judgements: int = 0
    label_judgements: int = 0
    skipped: int = 0  # no answer / no tool calls: nothing to ask
    requests: int = 0  # HTTP calls sent
    successes: int = 0  # HTTP calls whose reply validated
    retries: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # by reason, one per failed HTTP call
    fallbacks: int = 0
    cache_hits: int = 0
    cache_errors: int = 0
    coalesced: int = 0  # served by an identical judgement already in flight
    forced_labels: int = 0  # labels of failed/unknown-tool calls corrected to the rule label
    latency_sum_s: float = 0.0
    latency_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_sum_s / self.latency_count if self.latency_count else 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, float]:
        """Flat numbers for a metrics sink; every failure reason is present, zeros included."""
        out: dict[str, float] = {k: v for k, v in vars(self).items() if k != "failures" and isinstance(v, (int, float))}
        out.update({f"failures_{r}": self.failures.get(r, 0) for r in FAILURE_REASONS})
        out["mean_latency_s"] = self.mean_latency_s
        out["total_tokens"] = self.total_tokens
        return out


Source = Literal["llm", "cache", "shared", "rule", "skipped"]


@dataclass(frozen=True)
class JudgeOutcome:
    verdict: Verdict
    correct: bool
    source: Source
    attempts: int = 0
    fallback: bool = False
    error: str = ""  # the last failure when fallback is True


@dataclass(frozen=True)
class LabelOutcome:
    labels: list[str]
    source: Source
    attempts: int = 0
    fallback: bool = False
    error: str = ""
    forced: int = 0


class _CallFailed(Exception):
    def __init__(self, reason: str, detail: str, *, retryable: bool = True, retry_after_s: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Result:
    reply: dict[str, Any] | None  # the validated reply as JSON, None when every attempt failed
    attempts: int
    source: Source
    error: str = ""


AnswerFallback = Callable[[str | None, Sequence[str]], bool]
LabelsFallback = Callable[[Sequence[ToolCall], int], list[str]]


def rule_labels_fallback(tool_calls: Sequence[ToolCall], budget_verification: int) -> list[str]:
    return rule_labels(tool_calls, budget_verification=budget_verification)


# --------------------------------------------------------------------------------------------
# The client


class JudgeClient:
    """Async answer judge and step labeller over an OpenAI-compatible chat-completions API.

    Create and use it inside one event loop (it holds a connection pool and a semaphore).
    """

    def __init__(
        self,
        settings: JudgeSettings,
        *,
        cache: JudgeCache | None = None,
        answer_fallback: AnswerFallback | None = rule_judge,
        labels_fallback: LabelsFallback | None = rule_labels_fallback,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ):
        self.settings = settings
        self.cache = cache
        self._cache = GuardedCache(cache, "judge", "asking the judge", on_error=self._count_cache_error)
        self.answer_fallback = answer_fallback
        self.labels_fallback = labels_fallback
        self.stats = JudgeStats()
        self._rand = rand
        self._sleep = sleep
        key = load_api_key(settings)
        self._headers = {"Authorization": f"Bearer {key.get_secret_value() if key is not None else 'EMPTY'}"}
        self._url = f"{settings.base_url}/chat/completions"
        # Made on first use, inside the event loop it binds to.
        self._session: aiohttp.ClientSession | None = None
        self._semaphore = asyncio.Semaphore(settings.max_in_flight)
        self._limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, sleep=sleep)
        self._pending: dict[str, asyncio.Future[_Result | None]] = {}

    def __repr__(self) -> str:
        return f"JudgeClient(base_url={self.settings.base_url!r}, model={self.settings.model!r})"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # aiohttp rather than the openai SDK: the SDK spends ~3 ms of CPU per call building and
        # parsing typed requests and replies (aiohttp: ~0.3 ms), and at a few hundred calls per
        # second on a few cores that CPU, not the judge, is what bounds the pool.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.max_in_flight),
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                headers=self._headers,
                raise_for_status=False,
            )
        return self._session

    async def __aenter__(self) -> JudgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API --------------------------------------------------------------------------

    async def judge_answer(self, question: str, gold: str | Sequence[str], answer: str | None) -> JudgeOutcome:
        """Is `answer` correct for `question` given the gold answer(s)? Always returns a usable verdict
        unless every attempt failed and answer_fallback is None (JudgeUnavailableError)."""
        golds = as_golds(gold)
        self.stats.answer_judgements += 1
        if answer is None or not answer.strip():
            # Nothing to compare; the paper's judge would say "unknown" and score it 0 anyway.
            self.stats.skipped += 1
            return JudgeOutcome("unknown", False, "skipped")
        messages = answer_prompt(question, golds, answer)
        result = await self._judge(ANSWER_TASK, messages, lambda text: (parse_answer_reply(text).model_dump(), 0))
        if result.reply is not None:
            verdict = result.reply["verdict"]
            return JudgeOutcome(verdict, verdict == "correct", result.source, result.attempts)
        if self.answer_fallback is None:
            raise JudgeUnavailableError(f"answer judge failed after {result.attempts} attempts: {result.error}")
        self.stats.fallbacks += 1
        log.warning("answer judge fell back to the rule judge after %d attempts: %s", result.attempts, result.error)
        correct = bool(self.answer_fallback(answer, golds))
        return JudgeOutcome("correct" if correct else "incorrect", correct, "rule", result.attempts, True, result.error)

    async def label_steps(
        self, question: str, tool_calls: Sequence[ToolCall], *, budget_verification: int = 1
    ) -> LabelOutcome:
        """One stage-2 label per tool call, in order; rule labels when the LLM fails (see judge_answer)."""
        if budget_verification < 0:
            raise ValueError(f"budget_verification (B_v) must be >= 0, got {budget_verification}")
        self.stats.label_judgements += 1
        if not tool_calls:
            self.stats.skipped += 1
            return LabelOutcome([], "skipped")
        calls = list(tool_calls)
        messages = labels_prompt(
            question, calls, budget_verification=budget_verification, result_chars=self.settings.result_chars
        )

        def parse(text: str) -> tuple[dict[str, Any], int]:
            reply, forced = parse_labels_reply(text, calls)
            return reply.model_dump(), forced

        result = await self._judge(LABELS_TASK, messages, parse)
        if result.reply is not None:
            return LabelOutcome(list(result.reply["labels"]), result.source, result.attempts)
        if self.labels_fallback is None:
            raise JudgeUnavailableError(f"step labeller failed after {result.attempts} attempts: {result.error}")
        self.stats.fallbacks += 1
        log.warning("step labeller fell back to the rule labeller after %d attempts: %s", result.attempts, result.error)
        labels = list(self.labels_fallback(calls, budget_verification))
        return LabelOutcome(labels, "rule", result.attempts, True, result.error)

    # -- cache, sharing, retries -------------------------------------------------------------

    async def _judge(
        self, kind: str, messages: list[Message], parse: Callable[[str], tuple[dict[str, Any], int]]
    ) -> _Result:
        key = judgement_key(kind, self.settings.model, messages)
        cached = await self._cache_get(key, parse)
        if cached is not None:
            return cached
        while (pending := self._pending.get(key)) is not None:
            # shield: a cancelled waiter must not cancel the judgement the others wait for.
            shared = await asyncio.shield(pending)
            if shared is not None:
                self.stats.coalesced += 1
                return _Result(shared.reply, 0, "shared", shared.error)
            # The owner was cancelled before finishing: judge ourselves.
        future: asyncio.Future[_Result | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        result = None
        try:
            result = await self._call_with_retries(messages, parse)
            if result.reply is not None:
                await self._cache_set(key, result.reply)
            return result
        finally:
            del self._pending[key]
            future.set_result(result)

    def _count_cache_error(self) -> None:
        self.stats.cache_errors += 1

    async def _cache_get(self, key: str, parse: Callable[[str], tuple[dict[str, Any], int]]) -> _Result | None:
        value = await self._cache.get(key)
        if value is None:
            return None
        try:
            reply, _ = parse(json.dumps(value))
        except ReplyError:
            self.stats.cache_errors += 1
            log.warning("judge cache entry %s does not validate; asking the judge", key)
            return None
        self.stats.cache_hits += 1
        return _Result(reply, 0, "cache")

    async def _cache_set(self, key: str, reply: dict[str, Any]) -> None:
        await self._cache.set(key, reply)

    async def _call_with_retries(
        self, messages: list[Message], parse: Callable[[str], tuple[dict[str, Any], int]]
    ) -> _Result:
        s = self.settings
        error = ""
        attempts = 0
        for retry in range(s.max_retries + 1):
            attempts += 1
            try:
                text = await self._complete(messages)
                try:
                    reply, forced = parse(text)
                except ReplyError as e:
                    raise _CallFailed(e.reason, str(e)) from None
            except _CallFailed as failure:
                self.stats.failures[failure.reason] += 1
                error = f"{failure.reason}: {failure}"
                if not failure.retryable or retry == s.max_retries:
                    break
                delay = retry_delay(
                    retry,
                    base_s=s.backoff_base_s,
                    max_s=s.backoff_max_s,
                    jitter=s.jitter,
                    retry_after_s=failure.retry_after_s,
                    retry_after_max_s=s.retry_after_max_s,
                    rand=self._rand,
                )
                self.stats.retries += 1
                log.debug("judge call failed (%s); retry %d in %.2f s", error, retry + 1, delay)
                await self._sleep(delay)
                continue
            self.stats.successes += 1
            self.stats.forced_labels += forced
            return _Result(reply, attempts, "llm")
        return _Result(None, attempts, "rule", error)

    async def _complete(self, messages: list[Message]) -> str:
        """One chat completion; every failure becomes a _CallFailed with its stats reason."""
        s = self.settings
        extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if s.json_mode else {}
        estimate = estimate_tokens(messages, s.max_tokens)
        body = {
            "model": s.model,
            "messages": messages,
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
            **extra,
        }
        async with self._semaphore:
            await self._limiter.acquire(estimate)
            self.stats.requests += 1
            started = time.monotonic()
            try:
                async with self._http().post(self._url, json=body) as reply:
                    raw = await reply.read()
                    status, headers = reply.status, reply.headers
            except TimeoutError:  # aiohttp's total timeout bounds connecting, sending and a trickling reply
                raise _CallFailed("timeout", f"no reply within {s.timeout_s:g} s") from None
            except (aiohttp.ClientError, OSError) as e:
                raise _CallFailed("connection", f"cannot reach {s.base_url}: {type(e).__name__}: {e}") from None
            if status == 429:
                raise _CallFailed("http_429", _status_detail(status, raw), retry_after_s=parse_retry_after(headers))
            if status >= 500:
                raise _CallFailed("http_5xx", _status_detail(status, raw), retry_after_s=parse_retry_after(headers))
            if status >= 300:
                # 400/401/403/404...: retrying the same request cannot help; fix the settings.
                raise _CallFailed("http_4xx", _status_detail(status, raw), retryable=False)
            self.stats.latency_sum_s += time.monotonic() - started
            self.stats.latency_count += 1
        try:
            response = json.loads(raw)
        except (ValueError, RecursionError) as e:
            # A body the client cannot decode (not JSON, or nested deep enough to exhaust the stack).
            raise _CallFailed("invalid_reply", f"the response body cannot be decoded ({type(e).__name__})") from None
        try:
            content = response["choices"][0]["message"]["content"] if response.get("choices") else None
            usage = response.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            detail = f"the response is not a chat completion: {type(e).__name__}: {e}"
            raise _CallFailed("invalid_reply", detail) from None
        if usage:
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self._limiter.settle(estimate, prompt_tokens + completion_tokens)
        if not isinstance(content, str) or not content:
            raise _CallFailed("invalid_reply", "the reply has no message content")
        return content


def _status_detail(status: int, raw: bytes) -> str:
    """The error message an OpenAI-style error body carries, else the start of the body."""
    try:
        error = json.loads(raw).get("error")
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError, RecursionError):
        message = raw.decode("utf-8", "replace")
    return f"HTTP {status} from the judge: {clip_text(str(message), 200)}"
