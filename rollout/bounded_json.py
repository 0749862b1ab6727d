"""JSON from outside (tool-call arguments, judge replies, dataset rows) parsed within size and depth limits.

The standard library's parser recurses once per nesting level, so `"[" * 100000` raises
RecursionError, which no caller expects. pydantic-core's parser (jiter, already a dependency)
is iterative up to a fixed recursion limit and reports deeper input as a ValueError; the limits
here are tighter, so that nothing downstream (validation, json.dumps, Redis) sees deep values.
Every failure is a JSONInputError with the line and column, never another exception type.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pydantic_core

# Deeper than any legitimate tool call, verdict or dataset row; far below Python's recursion limit.
MAX_DEPTH = 32
_POSITION_RE = re.compile(r" at line (\d+) column (\d+)$")


class JSONInputError(ValueError):
    """Text that is not JSON within the limits; `msg`, `line` and `column` say where (1-based line)."""

    def __init__(self, msg: str, line: int = 1, column: int = 0):
        super().__init__(f"{msg} at line {line} column {column}")
        self.msg, self.line, self.column = msg, line, column


def depth(value: Any) -> int:
    """Nesting depth of a parsed value: 0 for a scalar, 1 for a flat list or object (iterative).

    -1 when it holds a float out of range (1e400 parses as inf), which is no more JSON than NaN.
    """
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            if isinstance(node, float) and not math.isfinite(node):
                return -1
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(text: str | bytes, *, max_chars: int, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of `text`; JSONInputError when it is not JSON, longer than max_chars or nested too deep.

    NaN and Infinity are refused: they are not JSON, and a NaN reward or answer poisons every mean.
    """
    if len(text) > max_chars:
        raise JSONInputError(f"the JSON is {len(text)} characters long, over the limit of {max_chars}")
    try:
        value = pydantic_core.from_json(text, allow_inf_nan=False)
    except ValueError as e:
        message = str(e)
        match = _POSITION_RE.search(message)
        if match is None:
            raise JSONInputError(message) from None
        msg = message[: match.start()]
        if msg == "recursion limit exceeded":
            msg = f"nested deeper than {max_depth} levels"
        raise JSONInputError(msg, int(match.group(1)), int(match.group(2))) from None
    levels = depth(value)
    if levels < 0:
        raise JSONInputError("a number is out of range (larger than 1.8e308)")
    if levels > max_depth:
        raise JSONInputError(f"nested deeper than {max_depth} levels")
    return value
