"""Hostile model output: the tool-call scan before (a non-greedy regex) and now (str.find), side by side.

A turn of N unclosed "<tool_call>" tags made the regex try every tag against the rest of the
text: quadratic. The scan is linear. For each N it prints both times and their ratio; doubling
N should double the scan's time and quadruple the regex's.

    python -m bench.hostile_parsing --sizes 1000 2000 4000
"""

from __future__ import annotations

import argparse
import re
import time

from rollout.chat_format import parse_tool_calls

OLD_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def old_parse(text: str) -> int:
    """The former parser's two regex passes (the calls it returned do not matter for timing)."""
    found = sum(1 for _ in OLD_TOOL_CALL_RE.finditer(text))
    closed_end = 0
    for match in OLD_TOOL_CALL_RE.finditer(text):
        closed_end = match.end()
    return found + int("<tool_call>" in text[closed_end:])


def timed(fn, text: str) -> float:
    t0 = time.perf_counter()
    fn(text)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000], help="unclosed tags per turn")
    args = parser.parse_args()
    print(f"{'tags':>8} {'regex_s':>10} {'scan_s':>10} {'ratio':>8}")
    for n in args.sizes:
        text = "<tool_call>" * n
        old, new = timed(old_parse, text), timed(parse_tool_calls, text)
        print(f"{n:>8} {old:>10.4f} {new:>10.6f} {old / max(new, 1e-9):>8.0f}")


if __name__ == "__main__":
    main()
