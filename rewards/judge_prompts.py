"""The judge's prompts and the parsing of its replies (answer verdicts, stage-2 step labels).

The prompts embed the case as a fenced JSON block, so that a test server (and any log
reader) can parse the case back exactly; the instructions around it are prose for the model.
Replies must be JSON that validates; ReplyError says why one did not. A reply is untrusted
text: it is parsed in linear time within size and depth limits, and a reply that holds two
verdicts (two JSON values, or prose saying one verdict and JSON another) is malformed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, field_validator

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
from rewards.labeller import QUERY_TOOL, SEARCH_TOOL
from rollout import bounded_json
from rollout.types import ToolCall

ANSWER_TASK = "judge_answer"
LABELS_TASK = "label_tool_calls"
VERDICTS = ("correct", "incorrect", "unknown")

Message = dict[str, str]
Verdict = Literal["correct", "incorrect", "unknown"]

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
    Backticks are escaped (valid JSON) so that no answer or page text can close the fence early,
    and the "|" of "<|" so that no answer or page text spells a chat-control token for the judge
    server's tokenizer (still the same JSON: the case parses back exactly).
    """
    lines = []
    for key, value in case.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"  {_compact(v)}" for v in value)
            lines.append(f" {_compact(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {_compact(key)}: {_compact(value)}")
    body = "{\n" + ",\n".join(lines) + "\n}"
    return "```json\n" + body.replace("`", "\\u0060").replace("<|", "<\\u007c") + "\n```"


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


def as_golds(gold: str | Sequence[str]) -> tuple[str, ...]:
    golds = (gold,) if isinstance(gold, str) else tuple(gold)
    if not golds or not all(isinstance(g, str) for g in golds):
        raise ValueError(f"gold must be a str or a non-empty sequence of str, got {gold!r}")
    return golds


def answer_prompt(question: str, gold: str | Sequence[str], answer: str | None) -> list[Message]:
    """Chat messages asking for {"verdict": "correct" | "incorrect" | "unknown"}."""
    case = {"task": ANSWER_TASK, "question": question, "ground_truth": list(as_golds(gold)), "model_answer": answer or ""}
    user = (
        "Grade the agent's answer in this case (any ground-truth form counts):\n"
        f"{_json_block(case)}\n"
        'Reply with one JSON object: {"verdict": "correct" | "incorrect" | "unknown"}.'
    )
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]


def clip_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " [...]"


def _clip_arguments(arguments: Any, limit: int = 2000) -> Any:
    # A malformed call can carry anything; long strings would only cost tokens.
    if isinstance(arguments, dict):
        return {str(k): clip_text(v, limit) if isinstance(v, str) else v for k, v in arguments.items()}
    return arguments


def call_record(index: int, call: ToolCall, result_chars: int) -> dict[str, Any]:
    """What the labeller is shown of one tool call."""
    record: dict[str, Any] = {"index": index, "name": call.name, "arguments": _clip_arguments(call.arguments), "status": call.status}
    if call.name == SEARCH_TOOL and call.ok:
        record["returned_urls"] = list(call.urls)
    record["result"] = clip_text(call.result or call.error, result_chars)
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


# A verdict is a few words and labels a few dozen; a reply this long is not one.
MAX_REPLY_CHARS = 64_000
_BRACKETS_RE = re.compile(r'[\[\]{}"\\]')
_VERDICT_WORD_RE = re.compile(r"\b(correct|incorrect|unknown)\b", re.IGNORECASE)


def _json_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every top-level balanced {...} or [...] in the text, strings respected; one pass."""
    spans: list[tuple[int, int]] = []
    depth, start, in_string, escaped_at = 0, 0, False, -1
    for match in _BRACKETS_RE.finditer(text):
        i, ch = match.start(), match.group()
        if i == escaped_at or (not depth and ch in '"\\'):
            continue  # an escaped character, or a quote in the prose between values
        if ch == "\\":
            escaped_at = i + 1 if in_string else escaped_at
        elif ch == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif ch in "[{":
            start = i if depth == 0 else start
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def _loads(text: str) -> Any:
    return bounded_json.loads(text, max_chars=MAX_REPLY_CHARS)


def extract_json(text: str) -> tuple[Any, str]:
    """The one JSON value in a reply, and the prose around it.

    The value is the whole text, else the only balanced {...} or [...] that parses, else the only
    fenced block that parses. Two of them make the reply malformed: which verdict is meant?
    """
    stripped = text.strip()
    if len(stripped) > MAX_REPLY_CHARS:
        raise ReplyError("invalid_reply", f"the reply is {len(stripped)} characters long, over {MAX_REPLY_CHARS}")
    try:
        return _loads(stripped), ""
    except bounded_json.JSONInputError:
        pass
    found: list[tuple[Any, int, int]] = []
    for start, end in _json_spans(stripped):
        try:
            found.append((_loads(stripped[start:end]), start, end))
        except bounded_json.JSONInputError:
            continue
    if not found:
        for block in _FENCE_RE.finditer(stripped):
            try:
                found.append((_loads(block.group(1)), block.start(), block.end()))
            except bounded_json.JSONInputError:
                continue
    if not found:
        raise ReplyError("invalid_reply", f"no JSON in the reply {clip_text(stripped, 200)!r}")
    if len(found) > 1:
        raise ReplyError("invalid_reply", f"the reply holds {len(found)} JSON values where one is expected")
    value, start, end = found[0]
    return value, stripped[:start] + " " + stripped[end:]


def parse_answer_reply(text: str) -> AnswerReply:
    """{"verdict": ...}, fenced or bare JSON, or a lone verdict word; anything else is invalid.

    Prose beside the JSON may not name another verdict ('incorrect. {"verdict": "correct"}').
    """
    bare = _BARE_VERDICT_RE.match(text)
    if bare:
        return AnswerReply(verdict=bare.group(1).lower())  # type: ignore[arg-type]
    value, prose = extract_json(text)
    try:
        reply = AnswerReply.model_validate({"verdict": value} if isinstance(value, str) else value)
    except ValidationError:
        raise ReplyError("invalid_reply", f"the reply {clip_text(text.strip(), 200)!r} is not a verdict in {VERDICTS}") from None
    others = {w.lower() for w in _VERDICT_WORD_RE.findall(prose)} - {reply.verdict}
    if others:
        raise ReplyError("invalid_reply", f"the reply's prose says {min(others)!r} but its JSON says {reply.verdict!r}")
    return reply


def _forced_label(call: ToolCall) -> str | None:
    """The label a call gets whatever the judge says: failed and unknown-tool calls (as the rule labeller)."""
    if call.name not in (SEARCH_TOOL, QUERY_TOOL):
        return REDUNDANTSEARCH
    if not call.ok:
        return REDUNDANTSEARCH if call.name == SEARCH_TOOL else REDUNDANTQUERY
    return None


def parse_labels_reply(text: str, tool_calls: Sequence[ToolCall]) -> tuple[LabelsReply, int]:
    """The validated labels, with failed and unknown-tool calls forced, and how many were forced."""
    value, _ = extract_json(text)
    try:
        reply = LabelsReply.model_validate({"labels": value} if isinstance(value, list) else value)
    except ValidationError:
        shown = clip_text(text.strip(), 200)
        expected = f'{{"labels": [...]}} with labels from {LABELS}'
        raise ReplyError("invalid_reply", f"the reply {shown!r} is not {expected}") from None
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
