"""LLM judge over any OpenAI-compatible endpoint: answer verdicts and stage-2 step labels.

One HTTP call judges one answer, and one call labels a whole trajectory (the labels of later
calls depend on earlier ones, so they are judged together). Replies must be JSON that
validates; anything else is retried like a transport error, with exponential backoff and
jitter, and after the last retry the caller's rule-based path answers instead (DESIGN.md §5:
judge failures fall back and are counted, never silently scored 0). Identical judgements
are served from a cache, or shared with an identical one in flight, so they are paid once.

The prompts embed the case as a fenced JSON block, so that a test server (and any log
reader) can parse the case back exactly; the instructions around it are prose for the model.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import openai
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from rewards.answer import rule_judge
from rewards.formulas import (
    EXPLORATION,
    LABELS,
    QUERY_LABELS,
    REDUNDANTQUERY,
    REDUNDANTSEARCH,
    SEARCH_LABELS,
    UNIQUESEARCH,
    VERIFICATION,
)
from rewards.labeller import QUERY_TOOL, SEARCH_TOOL, rule_labels
from rollout.types import ToolCall

log = logging.getLogger(__name__)

ANSWER_TASK = "judge_answer"
LABELS_TASK = "label_tool_calls"
VERDICTS = ("correct", "incorrect", "unknown")

Message = dict[str, str]
Verdict = Literal["correct", "incorrect", "unknown"]


class JudgeConfigError(ValueError):
    """The judge cannot be set up as configured; the message says what to change."""


class JudgeUnavailableError(RuntimeError):
    """Every attempt failed and no fallback was given."""


# --------------------------------------------------------------------------------------------
# Settings and the API key


class JudgeSettings(BaseModel):
    """Where the judge lives and how hard to push it. Holds no secret: the key is read at client creation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    model: str = Field(min_length=1)
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
    if settings.api_key_file is not None:
        path = settings.api_key_file.expanduser()
        try:
            lines = path.read_text().strip().splitlines()
        except OSError as e:
            raise JudgeConfigError(f"cannot read the judge API key file {path}: {e.strerror}; fix the path or unset api_key_file") from None
        if not lines or not lines[0].strip():
            raise JudgeConfigError(f"the judge API key file {path} is empty; write the key on its first line")
        return SecretStr(lines[0].strip())
    key = os.environ.get(settings.api_key_env, "").strip()
    if key:
        return SecretStr(key)
    if settings.require_api_key:
        raise JudgeConfigError(
            f"no judge API key: set the {settings.api_key_env} environment variable or api_key_file, "
            "or set require_api_key=false for a judge server without authentication"
        )
    return None


# --------------------------------------------------------------------------------------------
# Prompts

ANSWER_SYSTEM = """You grade the answers of a question-answering agent. You are given a question, its ground-truth answer (one or more accepted forms) and the agent's answer, and you decide whether the agent's answer says the same thing as the ground truth.

Rules:
- Differences of case, accents, punctuation, articles, spacing and minor formatting do not matter.
- An alias, abbreviation or alternative spelling of the same entity, or the same quantity written differently, matches.
- For a multiple-choice question, compare the option letters.
- An answer that names a different entity or value, lists several candidates, or adds a claim that contradicts the ground truth is incorrect.
- If the agent's answer is empty, a refusal, or cannot be compared, the verdict is unknown.

Reply with one JSON object and nothing else: {"verdict": "correct"}, {"verdict": "incorrect"} or {"verdict": "unknown"}."""

LABELS_SYSTEM = f"""You audit the tool calls of a web-research agent. The agent has two tools: {SEARCH_TOOL}(query) returns a ranked list of URLs, and {QUERY_TOOL}(url, goal) reads one page looking for the goal. Give every tool call exactly one label, judging it against the calls before it:

For {SEARCH_TOOL} calls:
- {UNIQUESEARCH}: the query looks for entities or facts that no earlier search looked for.
- {REDUNDANTSEARCH}: the query is essentially an earlier query again (a rewording, the same entities and intent), or its results largely repeat the URLs an earlier search returned. A failed search (status other than "ok") is also {REDUNDANTSEARCH}.

For {QUERY_TOOL} calls:
- {EXPLORATION}: the first read of a URL for a goal no earlier call looked for, or a re-read of an already-read URL for a goal not asked of that URL before.
- {VERIFICATION}: a read of a URL not read before whose goal checks a claim or fact that an earlier {QUERY_TOOL} call already looked for on another URL (a cross-source check). Each claim allows at most B_v verifications (B_v is given with the calls); further checks of the same claim are {REDUNDANTQUERY}.
- {REDUNDANTQUERY}: a re-read of a URL for a goal already asked of that URL, a cross-source check of a claim whose B_v verifications are used up, or a failed call (status other than "ok").

Any call to a tool other than {SEARCH_TOOL} and {QUERY_TOOL} is {REDUNDANTSEARCH}. A {SEARCH_TOOL} call only ever gets a search label and a {QUERY_TOOL} call only ever gets a query label.

Reply with one JSON object and nothing else: {{"labels": [...]}}, with one label per tool call, in the order of the calls."""


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _json_block(case: Mapping[str, Any]) -> str:
    """The case as fenced JSON: one key per line, and one line per item of a list of objects.

    Compact enough to be cheap in tokens, regular enough for a model to read call by call.
    Backticks are escaped (valid JSON) so that no answer or page text can close the fence early.
    """
    lines = []
    for key, value in case.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"  {_compact(v)}" for v in value)
            lines.append(f" {_compact(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {_compact(key)}: {_compact(value)}")
    body = "{\n" + ",\n".join(lines) + "\n}"
    return "```json\n" + body.replace("`", "\\u0060") + "\n```"


_FENCE_RE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)


def embedded_case(messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON case embedded in the last user message of a judge prompt (what a server reads back)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            blocks = _FENCE_RE.findall(str(message.get("content", "")))
            if not blocks:
                break
            case = json.loads(blocks[-1])
            if not isinstance(case, dict) or "task" not in case:
                raise ValueError("the judge prompt's JSON block has no 'task'")
            return case
    raise ValueError("no user message with a fenced JSON case in the judge prompt")


def _as_golds(gold: str | Sequence[str]) -> tuple[str, ...]:
    golds = (gold,) if isinstance(gold, str) else tuple(gold)
    if not golds or not all(isinstance(g, str) for g in golds):
        raise ValueError(f"gold must be a str or a non-empty sequence of str, got {gold!r}")
    return golds


def answer_prompt(question: str, gold: str | Sequence[str], answer: str | None) -> list[Message]:
    """Chat messages asking for {"verdict": "correct" | "incorrect" | "unknown"}."""
    case = {"task": ANSWER_TASK, "question": question, "ground_truth": list(_as_golds(gold)), "model_answer": answer or ""}
    user = (
        "Grade the agent's answer in this case (any ground-truth form counts):\n"
        f"{_json_block(case)}\n"
        'Reply with one JSON object: {"verdict": "correct" | "incorrect" | "unknown"}.'
    )
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " [...]"


def _clip_arguments(arguments: Any, limit: int = 2000) -> Any:
    # A malformed call can carry anything; long strings would only cost tokens.
    if isinstance(arguments, dict):
        return {str(k): _clip(v, limit) if isinstance(v, str) else v for k, v in arguments.items()}
    return arguments


def call_record(index: int, call: ToolCall, result_chars: int) -> dict[str, Any]:
    """What the labeller is shown of one tool call."""
    record: dict[str, Any] = {"index": index, "name": call.name, "arguments": _clip_arguments(call.arguments), "status": call.status}
    if call.name == SEARCH_TOOL and call.ok:
        record["returned_urls"] = list(call.urls)
    record["result"] = _clip(call.result or call.error, result_chars)
    return record


def labels_prompt(
    question: str, tool_calls: Sequence[ToolCall], *, budget_verification: int = 1, result_chars: int = 300
) -> list[Message]:
    """Chat messages asking for {"labels": [one label per tool call]} for the whole trajectory."""
    case = {
        "task": LABELS_TASK,
        "question": question,
        "budget_verification": budget_verification,
        "number_of_calls": len(tool_calls),
        "tool_calls": [call_record(i, c, result_chars) for i, c in enumerate(tool_calls, 1)],
    }
    user = (
        f"Label each of the {len(tool_calls)} tool calls of this trajectory (B_v = {budget_verification}):\n"
        f"{_json_block(case)}\n"
        f'Reply with one JSON object: {{"labels": [...]}} holding exactly {len(tool_calls)} labels from '
        f"{', '.join(LABELS)}, in call order."
    )
    return [{"role": "system", "content": LABELS_SYSTEM}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------
# Reply parsing


class ReplyError(ValueError):
    """A reply that does not validate; `reason` is the JudgeStats failure key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class AnswerReply(BaseModel):
    verdict: Verdict

    @field_validator("verdict", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class LabelsReply(BaseModel):
    labels: list[Literal[UNIQUESEARCH, REDUNDANTSEARCH, EXPLORATION, VERIFICATION, REDUNDANTQUERY]]  # type: ignore[valid-type]

    @field_validator("labels", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return [v.strip().upper() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


_BARE_VERDICT_RE = re.compile(r"^[\s\"'`*.:]*(correct|incorrect|unknown)[\s\"'`*.!]*$", re.IGNORECASE)


def extract_json(text: str) -> Any:
    """The JSON value in a reply: the whole text, a ```json fenced block, or the outermost {...}."""
    stripped = text.strip()
    candidates = [stripped, *(_FENCE_RE.findall(stripped))]
    start, end = stripped.find("{"), stripped.rfind("}")
    if 0 <= start < end:
        candidates.append(stripped[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    raise ReplyError("invalid_reply", f"no JSON in the reply {_clip(stripped, 200)!r}")


def parse_answer_reply(text: str) -> AnswerReply:
    """{"verdict": ...}, fenced or bare JSON, or a lone verdict word; anything else is invalid."""
    bare = _BARE_VERDICT_RE.match(text)
    if bare:
        return AnswerReply(verdict=bare.group(1).lower())  # type: ignore[arg-type]
    value = extract_json(text)
    try:
        return AnswerReply.model_validate({"verdict": value} if isinstance(value, str) else value)
    except ValidationError:
        raise ReplyError("invalid_reply", f"the reply {_clip(text.strip(), 200)!r} is not a verdict in {VERDICTS}") from None


def _forced_label(call: ToolCall) -> str | None:
    """The label a call gets whatever the judge says: failed and unknown-tool calls (as the rule labeller)."""
    if call.name not in (SEARCH_TOOL, QUERY_TOOL):
        return REDUNDANTSEARCH
    if not call.ok:
        return REDUNDANTSEARCH if call.name == SEARCH_TOOL else REDUNDANTQUERY
    return None


def parse_labels_reply(text: str, tool_calls: Sequence[ToolCall]) -> tuple[LabelsReply, int]:
    """The validated labels, with failed and unknown-tool calls forced, and how many were forced."""
    value = extract_json(text)
    try:
        reply = LabelsReply.model_validate({"labels": value} if isinstance(value, list) else value)
    except ValidationError:
        raise ReplyError("invalid_reply", f"the reply {_clip(text.strip(), 200)!r} is not {{\"labels\": [...]}} with labels from {LABELS}") from None
    if len(reply.labels) != len(tool_calls):
        raise ReplyError("wrong_label_count", f"{len(reply.labels)} labels for {len(tool_calls)} tool calls")
    labels, forced = [], 0
    for i, (label, call) in enumerate(zip(reply.labels, tool_calls), 1):
        must = _forced_label(call)
        if must is not None:
            forced += label != must
            labels.append(must)
            continue
        allowed = SEARCH_LABELS if call.name == SEARCH_TOOL else QUERY_LABELS
        if label not in allowed:
            raise ReplyError("invalid_reply", f"call {i} ({call.name}) labelled {label}; allowed: {', '.join(allowed)}")
        labels.append(label)
    return LabelsReply(labels=labels), forced


# --------------------------------------------------------------------------------------------
# Rate limiting, backoff


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


def estimate_tokens(messages: Sequence[Message], max_tokens: int) -> int:
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


# --------------------------------------------------------------------------------------------
# Cache


class JudgeCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def set(self, key: str, value: dict[str, Any]) -> None: ...


def judgement_key(kind: str, model: str, messages: Sequence[Message]) -> str:
    """sha256 over what decides a judgement: its kind, the judge model and the exact prompt."""
    payload = json.dumps({"kind": kind, "model": model, "messages": list(messages)}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


class RedisJudgeCache:
    """Judgements as JSON under `{namespace}:judge:{key}` in Redis, optionally expiring."""

    def __init__(self, redis: Any, namespace: str, ttl_s: float | None = None):
        if not namespace:
            raise ValueError("RedisJudgeCache needs a namespace (e.g. the run id) so that runs do not share keys by accident")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s}")
        self.redis = redis
        self.namespace = namespace
        self.ttl_s = ttl_s

    def redis_key(self, key: str) -> str:
        return f"{self.namespace}:judge:{key}"

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.redis_key(key))
        return None if raw is None else json.loads(raw)

    async def set(self, key: str, value: dict[str, Any]) -> None:
        px = None if self.ttl_s is None else max(1, int(self.ttl_s * 1000))
        await self.redis.set(self.redis_key(key), json.dumps(value, separators=(",", ":")), px=px)


# --------------------------------------------------------------------------------------------
# Outcomes and counters

FAILURE_REASONS = ("http_429", "http_5xx", "http_4xx", "timeout", "connection", "invalid_reply", "wrong_label_count")


@dataclass
class JudgeStats:
    """Everything the judge did, for metrics: the lead's actor pool sums these across actors."""

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
        out: dict[str, float] = {
            k: v for k, v in vars(self).items() if k != "failures" and isinstance(v, (int, float))
        }
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
        self.answer_fallback = answer_fallback
        self.labels_fallback = labels_fallback
        self.stats = JudgeStats()
        self._rand = rand
        self._sleep = sleep
        key = load_api_key(settings)
        # max_retries=0: retries are ours, so that they are counted and share one backoff policy.
        self._openai = openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key=key.get_secret_value() if key is not None else "EMPTY",
            max_retries=0,
            timeout=settings.timeout_s,
        )
        self._semaphore = asyncio.Semaphore(settings.max_in_flight)
        self._limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, sleep=sleep)
        self._pending: dict[str, asyncio.Future[_Result | None]] = {}

    def __repr__(self) -> str:
        return f"JudgeClient(base_url={self.settings.base_url!r}, model={self.settings.model!r})"

    async def close(self) -> None:
        await self._openai.close()

    async def __aenter__(self) -> "JudgeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API --------------------------------------------------------------------------

    async def judge_answer(self, question: str, gold: str | Sequence[str], answer: str | None) -> JudgeOutcome:
        """Is `answer` correct for `question` given the gold answer(s)? Always returns a usable verdict
        unless every attempt failed and answer_fallback is None (JudgeUnavailableError)."""
        golds = _as_golds(gold)
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
        messages = labels_prompt(question, calls, budget_verification=budget_verification, result_chars=self.settings.result_chars)

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

    async def _judge(self, kind: str, messages: list[Message], parse: Callable[[str], tuple[dict[str, Any], int]]) -> _Result:
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

    async def _cache_get(self, key: str, parse: Callable[[str], tuple[dict[str, Any], int]]) -> _Result | None:
        if self.cache is None:
            return None
        try:
            value = await self.cache.get(key)
        except Exception as e:  # noqa: BLE001 - a cache outage costs money, not correctness
            self.stats.cache_errors += 1
            log.warning("judge cache read failed (%s: %s); asking the judge", type(e).__name__, e)
            return None
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
        if self.cache is None:
            return
        try:
            await self.cache.set(key, reply)
        except Exception as e:  # noqa: BLE001
            self.stats.cache_errors += 1
            log.warning("judge cache write failed (%s: %s)", type(e).__name__, e)

    async def _call_with_retries(self, messages: list[Message], parse: Callable[[str], tuple[dict[str, Any], int]]) -> _Result:
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
                    retry, base_s=s.backoff_base_s, max_s=s.backoff_max_s, jitter=s.jitter,
                    retry_after_s=failure.retry_after_s, retry_after_max_s=s.retry_after_max_s, rand=self._rand,
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
        async with self._semaphore:
            await self._limiter.acquire(estimate)
            self.stats.requests += 1
            started = time.monotonic()
            try:
                # The outer timeout guards against a server that trickles bytes under the read timeout.
                response = await asyncio.wait_for(
                    self._openai.chat.completions.create(
                        model=s.model, messages=messages, temperature=s.temperature, max_tokens=s.max_tokens, **extra
                    ),
                    timeout=s.timeout_s + 1.0,
                )
            except openai.RateLimitError as e:
                raise _CallFailed("http_429", _status_detail(e), retry_after_s=parse_retry_after(e.response.headers)) from None
            except openai.APIStatusError as e:
                if e.status_code >= 500:
                    raise _CallFailed("http_5xx", _status_detail(e), retry_after_s=parse_retry_after(e.response.headers)) from None
                # 400/401/403/404...: retrying the same request cannot help; fix the settings.
                raise _CallFailed("http_4xx", _status_detail(e), retryable=False) from None
            except (openai.APITimeoutError, asyncio.TimeoutError):
                raise _CallFailed("timeout", f"no reply within {s.timeout_s:g} s") from None
            except openai.APIConnectionError as e:
                raise _CallFailed("connection", f"cannot reach {s.base_url}: {e}") from None
            except openai.APIResponseValidationError as e:
                raise _CallFailed("invalid_reply", f"the response is not a chat completion: {e}") from None
            self.stats.latency_sum_s += time.monotonic() - started
            self.stats.latency_count += 1
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.stats.prompt_tokens += usage.prompt_tokens or 0
            self.stats.completion_tokens += usage.completion_tokens or 0
            self._limiter.settle(estimate, (usage.prompt_tokens or 0) + (usage.completion_tokens or 0))
        if not response.choices or not response.choices[0].message.content:
            raise _CallFailed("invalid_reply", "the reply has no message content")
        return response.choices[0].message.content


def _status_detail(e: openai.APIStatusError) -> str:
    return f"HTTP {e.status_code} from the judge: {_clip(str(e.message), 200)}"
