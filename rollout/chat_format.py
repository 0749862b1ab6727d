"""ChatML episode format: system prompt, tool-call parsing, tool-response turns, final answers.

The loop works on token ids; this module only defines the text pieces and parses what the
model wrote. Every parse failure is a value (ToolCallError), never an exception, so a
model emitting garbage cannot crash a worker.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)

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


def prompt_text(question: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    return (
        f"{IM_START}system\n{system_prompt}{IM_END}\n"
        f"{IM_START}user\n{question}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


def tool_turn_text(responses: list[str]) -> str:
    """What follows an assistant turn that ended with IM_END: the tool results, then a new assistant turn."""
    body = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in responses)
    return f"\n{IM_START}user\n{body}{IM_END}\n{IM_START}assistant\n"


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
    """All <tool_call> blocks of one assistant turn, in order.

    An opening tag with no closing one is reported too: the model tried to call a tool.
    """
    calls: list[ParsedCall | ToolCallError] = []
    for match in TOOL_CALL_RE.finditer(text):
        calls.append(_parse_one(match.group(1)))
    closed_end = 0
    for match in TOOL_CALL_RE.finditer(text):
        closed_end = match.end()
    if "<tool_call>" in text[closed_end:]:
        raw = text[text.index("<tool_call>", closed_end) :]
        calls.append(ToolCallError(raw=raw, reason="unterminated <tool_call>: close it with </tool_call>"))
    return calls


def _parse_one(raw: str) -> ParsedCall | ToolCallError:
    body = raw.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallError(raw=raw, reason=f"tool call is not valid JSON ({e.msg} at char {e.pos})")
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
    """Content of the last \\boxed{...}, with nested braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth == 0:
            return text[i : j - 1].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def turn_is_well_formed(text: str, final: bool) -> bool:
    """A turn thinks in at least one <think>...</think> block, with as many closings as openings (any
    number of balanced blocks passes); a final turn holds \\boxed{}, others a tool call."""
    if text.count("<think>") < 1 or text.count("<think>") != text.count("</think>"):
        return False
    if not THINK_RE.search(text):
        return False
    if text.count("<tool_call>") != text.count("</tool_call>"):
        return False
    if final:
        return extract_boxed(text) is not None and "<tool_call>" not in text
    return "<tool_call>" in text
