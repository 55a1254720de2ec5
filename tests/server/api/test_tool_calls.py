"""Hermes tool-call parsing: whole outputs and the incremental parser agree for any split."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.tool_calls import (
    ToolCallParser,
    parse_tool_call_body,
    parse_tool_calls,
    tool_call_deltas,
)

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


def events_of(text: str, cuts: list[int], names=None, max_calls=None) -> list:
    parser = ToolCallParser(names, max_calls)
    events, pos = [], 0
    for cut in [*sorted(cuts), len(text)]:
        events += parser.push_events(text[pos:cut])
        pos = max(pos, cut)
    return events + parser.finish_events()


def test_a_call_streams_its_name_first_then_its_arguments():
    parser = ToolCallParser({"get_weather"})
    assert parser.push_events("Let me look.\n<tool_call>\n") == ["Let me look."]
    assert parser.push_events('{"name": "get_wea') == []
    assert parser.push_events('ther", "arguments": ') == []  # the value has not begun
    first, brace = parser.push_events("{")
    assert first.is_first and not first.is_last and first.arguments == ""
    assert brace.arguments == "{" and not brace.is_first
    assert first.to_delta() == {
        "index": 0,
        "id": first.call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    (piece,) = parser.push_events('"city": "Pa')
    assert piece.to_delta() == {"index": 0, "function": {"arguments": '"city": "Pa'}}
    (piece,) = parser.push_events('ris"}}')  # the call object's own brace is held back
    assert piece.arguments == 'ris"}' and not piece.is_last
    (last,) = parser.push_events("\n</tool_call>")
    assert last.is_last and last.arguments == ""
    assert last.call.arguments == '{"city": "Paris"}'
    assert parser.finish_events() == []


def test_streamed_pieces_add_up_for_any_split():
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": "}}", "b": [1, {}]} }</tool_call> ok'
    whole = events_of(text, [])
    for cut in range(len(text) + 1):
        events = events_of(text, [cut])
        pieces = [e for e in events if not isinstance(e, str)]
        assert "".join(p.arguments for p in pieces) == '{"a": "}}", "b": [1, {}]}'
        assert sum(p.is_first for p in pieces) == 1 and pieces[-1].is_last
        assert "".join(e for e in events if isinstance(e, str)) == "Hi ok"
    assert tool_call_deltas([e for e in whole if not isinstance(e, str)]) == [
        {
            "index": 0,
            "id": whole[1].call.id,
            "type": "function",
            "function": {"name": "f", "arguments": '{"a": "}}", "b": [1, {}]}'},
        }
    ]


def test_undeclared_or_extra_calls_do_not_stream_and_stay_content():
    text = '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert events_of(text, [30], names={"f"}) == [text]
    two = text.replace('"g"', '"f"') * 2
    events = events_of(two, [5, 40, 70], names={"f"}, max_calls=1)
    assert [e.is_last for e in events if not isinstance(e, str)][-1]
    assert [e for e in events if isinstance(e, str)] == [two[len(two) // 2 :]]


def test_a_cut_off_streaming_call_ends_at_finish():
    events = events_of('<tool_call>{"name": "f", "arguments": {"a": 1', [20])
    assert events[-1].is_last and events[-1].call.arguments == '{"a": 1'
