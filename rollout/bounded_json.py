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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

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
    if isinstance(text, str):
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError as e:
            line, column = text.count("\n", 0, e.start) + 1, e.start - text.rfind("\n", 0, e.start)
            raise JSONInputError("not valid Unicode (a lone surrogate)", line, column) from None
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


# A dataset row or a corpus page; a longer line is a broken file (or not a JSONL file at all).
MAX_LINE_BYTES = 4 * 1024 * 1024


def jsonl_rows(
    path: str | Path, *, error: type[ValueError], example: str, max_line_bytes: int = MAX_LINE_BYTES,
    stream: BinaryIO | None = None,
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, "FILE: line N", row) for every non-blank line of a JSONL file of objects.

    Everything wrong with the file raises `error` with a message naming the file and line and what
    to fix: missing, a directory, unreadable, not UTF-8, a line too long, not JSON, not an object.
    `stream` reads the lines from an open binary file instead, `path` only naming it in messages.
    """
    path = Path(path)
    if stream is None:
        if path.is_dir():
            raise error(f"{path} is a directory; give the path of a JSONL file (one JSON object per line)")
        try:
            stream = path.open("rb")
        except FileNotFoundError:
            raise error(f"{path} does not exist") from None
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror}") from None
    with stream as fh:
        n = 0
        while raw := fh.readline(max_line_bytes + 1):
            n += 1
            where = f"{path}: line {n}"
            if len(raw) > max_line_bytes:
                raise error(f"{where}: longer than {max_line_bytes} bytes; is this a JSONL file (one object per line)?")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the file as UTF-8"
                ) from None
            if n == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                row = loads(line, max_chars=max_line_bytes)
            except JSONInputError as e:
                raise error(
                    f"{where}: invalid JSON ({e.msg} at column {e.column}); write one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise error(f"{where}: expected a JSON object {example}, got {_json_kind(row)}")
            yield n, where, row


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", list: "an array", str: "a string", int: "a number", float: "a number",
             type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
