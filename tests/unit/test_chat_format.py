import json

from hypothesis import given, strategies as st

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


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3), st.text(min_size=1, max_size=12))
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
    assert t.startswith("\n<|im_start|>user\n") and t.count("<tool_response>") == 2 and t.endswith("<|im_start|>assistant\n")
