"""Hermes tool-call parsing: whole outputs and the incremental parser agree for any split."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.tool_calls import ToolCallParser, parse_tool_call_body, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def stream(text: str, cuts: list[int]) -> tuple[str, list]:
    parser = ToolCallParser()
    content, calls, pos = "", [], 0
    for cut in [*sorted(cuts), len(text)]:
        piece, new = parser.push(text[pos:cut])
        content += piece
        calls += new
        pos = max(pos, cut)
    piece, new = parser.finish()
    return content + piece, calls + new


def test_plain_text_is_untouched():
    assert parse_tool_calls("Hello <b>world</b>  \n") == ("Hello <b>world</b>  \n", [])


def test_single_call():
    content, calls = parse_tool_calls(CALL)
    assert content is None
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    d = calls[0].to_dict()
    assert d["type"] == "function" and d["id"].startswith("call_") and len(d["id"]) == 29
    assert d["function"] == {"name": "get_weather", "arguments": calls[0].arguments}


def test_content_before_and_two_calls():
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Rome") + "\n"
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    assert calls[0].id != calls[1].id


def test_invalid_json_stays_content():
    text = "x <tool_call>{not json}</tool_call> y"
    assert parse_tool_calls(text) == (text, [])


def test_unclosed_call_with_valid_json_counts():
    content, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')
    assert content is None and calls[0].name == "f" and calls[0].arguments == "{}"


def test_unclosed_invalid_call_is_content():
    assert parse_tool_calls('<tool_call>{"name": "f"') == ('<tool_call>{"name": "f"', [])


def test_body_variants():
    assert parse_tool_call_body('{"name": "f", "parameters": {"a": 1}}').arguments == '{"a": 1}'
    assert (
        parse_tool_call_body('{"name": "f", "arguments": "{\\"a\\": 1}"}').arguments == '{"a": 1}'
    )
    assert parse_tool_call_body('{"name": "f"}').arguments == "{}"
    assert (
        parse_tool_call_body('{"name": "été", "arguments": {"v": "é"}}').arguments == '{"v": "é"}'
    )
    assert parse_tool_call_body('{"arguments": {}}') is None
    assert parse_tool_call_body('["f"]') is None
    assert parse_tool_call_body('{"name": ""}') is None


def test_streaming_holds_back_a_possible_tag():
    parser = ToolCallParser()
    assert parser.push("Hi <tool") == ("Hi", [])
    assert parser.push("box> more") == (" <toolbox> more", [])
    assert parser.push(" <tool_") == ("", [])
    content, calls = parser.push('call>{"name": "f", "arguments": {}}</tool_call>')
    assert content == "" and calls[0].name == "f"
    assert parser.finish() == ("", [])


def test_streaming_partial_tag_flushed_at_end():
    parser = ToolCallParser()
    assert parser.push("a <tool_ca") == ("a", [])
    assert parser.finish() == (" <tool_ca", [])


SEGMENTS = st.sampled_from(
    ["Hi", " ", "\n", "<tool_call>", "</tool_call>", "<tool", "_call>", '{"name": "f"', "}", ", ",
     '"arguments": {"a": [1, 2]}', "é", "<", "tool_call", "x"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(SEGMENTS, max_size=12).map("".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_split_gives_the_whole_answer(text, cuts):
    cuts = [c for c in cuts if c <= len(text)]
    content, calls = parse_tool_calls(text)
    s_content, s_calls = stream(text, cuts)
    assert [(c.name, c.arguments) for c in s_calls] == [(c.name, c.arguments) for c in calls]
    assert s_content == (content or "") or (content is None and not s_content.strip())
    if not calls:
        assert content == text  # nothing is lost when there is no tool call
