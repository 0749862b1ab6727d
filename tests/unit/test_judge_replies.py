"""Judge replies are untrusted text: fuzzed, the parsers raise only ReplyError, and what they accept round-trips."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.judge_prompts import ReplyError, parse_answer_reply, parse_labels_reply
from rollout.types import ToolCall

CALLS = [ToolCall("search_urls", {"query": "a"}), ToolCall("query_url", {"url": "u", "goal": "g"})]
# Cheap to draw and rich in trouble: brackets, quotes, escapes, fences, verdict words in and out of JSON.
_FRAGMENTS = ["{", "}", "[", "]", '"', "\\", ":", ",", " ", "\n", "```", "```json\n", "correct", "incorrect", "unknown",
              '"verdict"', '"labels"', '{"verdict": "correct"}', '{"verdict": "incorrect"}', '"UNIQUESEARCH"',
              '"EXPLORATION"', '["UNIQUESEARCH", "EXPLORATION"]', "NaN", "1e400", "null", "The answer is", "**", ".",
              "\ud800", "\u00e9"]
_replies = st.lists(st.sampled_from(_FRAGMENTS), max_size=10).map("".join)


@settings(max_examples=1500, deadline=None, database=None)
@given(_replies)
def test_fuzz_answer_replies(text):
    try:
        reply = parse_answer_reply(text)
    except ReplyError as e:
        assert e.reason == "invalid_reply"
        return
    assert parse_answer_reply(json.dumps(reply.model_dump())) == reply


@settings(max_examples=1000, deadline=None, database=None)
@given(_replies)
def test_fuzz_labels_replies(text):
    try:
        reply, forced = parse_labels_reply(text, CALLS)
    except ReplyError as e:
        assert e.reason in ("invalid_reply", "wrong_label_count")
        return
    assert parse_labels_reply(json.dumps(reply.model_dump()), CALLS) == (reply, 0)
    assert forced == 0
