"""ChatML episode format: system prompt, tool-call parsing, tool-response turns, final answers.

The loop works on token ids; this module only defines the text pieces and parses what the
model wrote. Every parse failure is a value (ToolCallError), never an exception, so a
model emitting garbage cannot crash a worker. Parsing is linear in the text: tags are found
with str.find, never with a backtracking regex, and JSON is parsed within bounds.

Turns are built as pieces: the template's control tokens (Control) and plain text. Only a
Control piece may become a control token id; text from a page, a question or a judge stays
text even when it spells "<|im_end|>" (rollout.safe_encode).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from rollout import bounded_json

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# A tool call is a name and a few short arguments; more than this is not a call worth parsing.
MAX_TOOL_CALL_CHARS = 64_000
_BRACE_RE = re.compile(r"[{}]")

TOOL_SCHEMAS: list[dict[str, Any]] = [
    {
        "name": "search_urls",
        "description": "web search; ranked title, url, snippet",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}},
            "required": ["query"],
        },
    },
    {
        "name": "query_url",
        "description": "read a page; the passages relevant to goal",
        "parameters": {
            "type": "object",
            "properties": {"url": {"type": "string"}, "goal": {"type": "string"}},
            "required": ["url", "goal"],
        },
    },
]

SYSTEM_PROMPT = (
    "You are a research agent: answer by searching the web.\nTools:\n"
    + "\n".join(json.dumps(s, separators=(",", ":")) for s in TOOL_SCHEMAS)
    + "\nThink in <think></think>. Call a tool with "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>; results come in '
    "<tool_response></tool_response>. Give the final answer as \\boxed{answer}."
)


@dataclass(frozen=True)
class Control:
    """A control token of the chat template (IM_START, IM_END): the only piece that may encode to a control id."""

    token: str


Piece = str | Control


def render(pieces: list[Piece]) -> str:
    return "".join(p.token if isinstance(p, Control) else p for p in pieces)


def prompt_pieces(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[Piece]:
    start, end = Control(IM_START), Control(IM_END)
    return [start, f"system\n{system_prompt}", end, "\n", start, f"user\n{question}", end, "\n", start, "assistant\n"]


def tool_turn_pieces(responses: list[str]) -> list[Piece]:
    """What follows an assistant turn that ended with IM_END: the tool results, then a new assistant turn."""
    body = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in responses)
    start, end = Control(IM_START), Control(IM_END)
    return ["\n", start, f"user\n{body}", end, "\n", start, "assistant\n"]


def prompt_text(question: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    return render(prompt_pieces(question, system_prompt))


def tool_turn_text(responses: list[str]) -> str:
    return render(tool_turn_pieces(responses))


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ToolCallError:
    raw: str
    reason: str
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


def parse_tool_calls(text: str) -> list[ParsedCall | ToolCallError]:
    """All <tool_call> blocks of one assistant turn, in order; one linear scan.

    Each block ends at the first </tool_call> after its opening tag. An opening tag with no
    closing one is reported too: the model tried to call a tool.
    """
    calls: list[ParsedCall | ToolCallError] = []
    pos = 0
    while (start := text.find(TOOL_CALL_OPEN, pos)) != -1:
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        if end == -1:
            calls.append(ToolCallError(raw=text[start:], reason="unterminated <tool_call>: close it with </tool_call>"))
            break
        calls.append(_parse_one(text[body_start:end]))
        pos = end + len(TOOL_CALL_CLOSE)
    return calls


def _parse_one(raw: str) -> ParsedCall | ToolCallError:
    body = raw.strip()
    try:
        obj = bounded_json.loads(body, max_chars=MAX_TOOL_CALL_CHARS)
    except bounded_json.JSONInputError as e:
        return ToolCallError(raw=raw, reason=f"tool call is not valid JSON ({e})")
    if not isinstance(obj, dict):
        return ToolCallError(raw=raw, reason='tool call must be a JSON object {"name": ..., "arguments": {...}}')
    name = obj.get("name")
    args = obj.get("arguments", obj.get("args"))
    if not isinstance(name, str) or not name:
        return ToolCallError(raw=raw, reason='tool call has no "name" string')
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ToolCallError(raw=raw, name=name, reason='"arguments" must be a JSON object')
    return ParsedCall(name=name, arguments=args)


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced; None if there is none.

    One pass pairs every brace with its match, so many unclosed \\boxed{ stay linear.
    """
    closing: dict[int, int] = {}
    open_at: list[int] = []
    for match in _BRACE_RE.finditer(text):
        if match.group() == "{":
            open_at.append(match.start())
        elif open_at:
            closing[open_at.pop()] = match.start()
    marker = "\\boxed{"
    start = text.rfind(marker)
    while start != -1:
        brace = start + len(marker) - 1
        if brace in closing:
            return text[brace + 1 : closing[brace]].strip()
        start = text.rfind(marker, 0, start)
    return None


def turn_is_well_formed(text: str, final: bool) -> bool:
    """A turn thinks in at least one <think>...</think> block, with as many closings as openings (any
    number of balanced blocks passes); a final turn holds \\boxed{}, others a tool call."""
    if text.count(THINK_OPEN) < 1 or text.count(THINK_OPEN) != text.count(THINK_CLOSE):
        return False
    first = text.find(THINK_OPEN)
    if text.find(THINK_CLOSE, first + len(THINK_OPEN)) == -1:
        return False
    if text.count(TOOL_CALL_OPEN) != text.count(TOOL_CALL_CLOSE):
        return False
    if final:
        return extract_boxed(text) is not None and TOOL_CALL_OPEN not in text
    return TOOL_CALL_OPEN in text
