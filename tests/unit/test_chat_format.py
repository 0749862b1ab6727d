import json

from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.chat_format import (
    ParsedCall,
    ToolCallError,
    extract_boxed,
    parse_tool_calls,
    prompt_text,
    tool_turn_text,
    turn_is_well_formed,
)


def test_parses_calls_in_order():
    text = (
        '<think>x</think>\n<tool_call>{"name": "search_urls", "arguments": {"query": "a"}}</tool_call>'
        '<tool_call>{"name": "query_url", "arguments": {"url": "u", "goal": "g"}}</tool_call>'
    )
    calls = parse_tool_calls(text)
    assert [c.name for c in calls] == ["search_urls", "query_url"]
    assert calls[1].arguments == {"url": "u", "goal": "g"}


def test_broken_json_is_an_error_value_not_an_exception():
    (call,) = parse_tool_calls('<tool_call>{"name": "search_urls", "arguments": {"query": </tool_call>')
    assert isinstance(call, ToolCallError)
    assert "not valid JSON" in call.reason


def test_missing_name_and_non_object_arguments():
    (a,) = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    (b,) = parse_tool_calls('<tool_call>{"name": "search_urls", "arguments": [1]}</tool_call>')
    (c,) = parse_tool_calls("<tool_call>[1, 2]</tool_call>")
    assert isinstance(a, ToolCallError) and "name" in a.reason
    assert isinstance(b, ToolCallError) and "arguments" in b.reason
    assert isinstance(c, ToolCallError)


def test_unterminated_call_is_reported():
    calls = parse_tool_calls('<think>t</think><tool_call>{"name": "search_urls"')
    assert len(calls) == 1 and isinstance(calls[0], ToolCallError) and "unterminated" in calls[0].reason


def test_no_call_means_final_answer():
    assert parse_tool_calls("<think>done</think> \\boxed{Paris}") == []


@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3), st.text(min_size=1, max_size=12)
)
def test_round_trip_of_any_json_call(arguments, name):
    text = "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
    (call,) = parse_tool_calls(text)
    if "</tool_call>" in json.dumps({"name": name, "arguments": arguments}):
        return  # the closing tag inside a string ends the block early: an error, by design
    assert isinstance(call, ParsedCall) and call.name == name and call.arguments == arguments


def test_extract_boxed_takes_the_last_and_balances_braces():
    assert extract_boxed("\\boxed{A} then \\boxed{B}") == "B"
    assert extract_boxed("\\boxed{f(x) = {1, 2}}") == "f(x) = {1, 2}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{A} and \\boxed{unclosed") == "A"


@given(st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=30))
def test_extract_boxed_round_trip(answer):
    assert extract_boxed(f"<think>t</think> \\boxed{{{answer}}}") == answer.strip()


def test_turn_format_rules():
    call = '<tool_call>{"name": "search_urls", "arguments": {"query": "q"}}</tool_call>'
    assert turn_is_well_formed(f"<think>a</think>\n{call}", final=False)
    assert not turn_is_well_formed(call, final=False)  # no think
    assert turn_is_well_formed("<think>a</think>\n\\boxed{X}", final=True)
    assert not turn_is_well_formed("<think>a</think>\nX", final=True)  # no box
    assert not turn_is_well_formed(f"<think>a</think>\n\\boxed{{X}}{call}", final=True)
    assert not turn_is_well_formed("<think>a\n\\boxed{X}", final=True)  # unclosed think


def test_prompt_and_tool_turn_are_chatml():
    p = prompt_text("Q?")
    assert p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n") and "Q?" in p
    t = tool_turn_text(["r1", "r2"])
    assert (
        t.startswith("\n<|im_start|>user\n")
        and t.count("<tool_response>") == 2
        and t.endswith("<|im_start|>assistant\n")
    )


# ---- hostile model output: bounded, linear, never an exception -------------------------------------


def test_deep_nesting_is_an_error_value_not_a_recursion_error():
    for body in ["[" * 1000, "[" * 100000, '{"name": "x", "arguments": ' + "{" * 50000]:
        (call,) = parse_tool_calls("<tool_call>" + body + "</tool_call>")
        assert isinstance(call, ToolCallError) and "not valid JSON" in call.reason
    (call,) = parse_tool_calls('<tool_call>{"name": "x", "arguments": {"a": ' + "[" * 40 + "]" * 40 + "}}</tool_call>")
    assert isinstance(call, ToolCallError) and "nested deeper than 32 levels" in call.reason


def test_many_unclosed_tags_parse_in_linear_time():
    # The old regex took about 61 s for 20,000 of them (quadratic); 200,000 here stay well under a second.
    calls = parse_tool_calls("<tool_call>" * 200_000)
    assert len(calls) == 1 and isinstance(calls[0], ToolCallError) and "unterminated" in calls[0].reason
    assert extract_boxed("\\boxed{" * 200_000) is None
    assert not turn_is_well_formed("</think>" * 100_000 + "<think>" * 100_000, final=False)


_OLD_TOOL_CALL_RE = __import__("re").compile(r"<tool_call>(.*?)</tool_call>", __import__("re").DOTALL)
_FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_call",
    "{",
    "}",
    "[",
    "]",
    '"',
    ":",
    ",",
    " ",
    "\\",
    '"name"',
    '"x"',
    '"arguments"',
    "{}",
    "<think>",
    "</think>",
    "\\boxed{",
    "NaN",
    "1e400",
    "<|im_end|>",
    "null",
    "a",
    "\u00e9",
    "\n",
    "7",
    "-",
    "\\u0000",
    "\ud800",
    "true",
]


@settings(max_examples=2500, deadline=None, database=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=14).map("".join))
def test_fuzz_tool_call_parser(text):
    calls = parse_tool_calls(text)  # never raises
    assert all(isinstance(c, (ParsedCall, ToolCallError)) for c in calls)
    # The same blocks the old regex found (it was right, only slow), plus one for an unclosed tag.
    closed = _OLD_TOOL_CALL_RE.findall(text)
    assert len(calls) - int(bool(calls) and "unterminated" in getattr(calls[-1], "reason", "")) == len(closed)
    for call in calls:
        if isinstance(call, ParsedCall):  # an accepted call round-trips
            body = json.dumps({"name": call.name, "arguments": call.arguments})
            again = parse_tool_calls(f"<tool_call>{body}</tool_call>")
            assert again == [call]
    turn_is_well_formed(text, final=True)
    extract_boxed(text)
