"""The Hermes tool prompt for templates that ignore tools: the rewrite equals what Qwen2.5's
template writes itself, and which templates get it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from model.text.tokenizer import Tokenizer
from model.text.tool_prompt import needs_tool_prompt, template_renders_tools, with_tool_prompt
from tests.model.text.test_chat_template import TOOL_CHAT, WEATHER_TOOL, qwen_pair  # noqa: F401


@pytest.fixture(scope="module")
def smol(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def test_default_model_template_ignores_tools_so_the_prompt_is_added(smol: Tokenizer) -> None:
    assert not smol.renders_tools and smol.uses_tool_prompt
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    without = smol.encode_chat(chat)
    with_tools = smol.encode_chat(chat, [WEATHER_TOOL])
    assert "get_weather" not in without.text
    assert "<tools>\n" in with_tools.text and '"name": "get_weather"' in with_tools.text
    assert "«quoted» ünïcode" in with_tools.text  # the description, not escaped
    assert len(with_tools.token_ids) > len(without.token_ids) + 50


def test_the_history_of_a_round_trip_is_kept(smol: Tokenizer) -> None:
    text = smol.encode_chat(TOOL_CHAT, [WEATHER_TOOL]).text
    assert text.count('<tool_call>\n{"name": "get_weather", "arguments": {"city": "') == 2
    assert '{"city": "Lyon"}}\n</tool_call>' in text
    assert "<tool_response>\n" + '{"temp": 21}' + "\n</tool_response>\n<tool_response>" in text
    assert text.startswith("<|im_start|>system\nYou can call tools.\n\n# Tools\n")
    # without tools (tool_choice "none") past calls and results still show as text
    no_tools = smol.encode_chat(TOOL_CHAT, None).text
    assert "<tool_response>" in no_tools and "<tools>" not in no_tools


def test_tool_prompt_none_leaves_the_template_alone(default_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(default_model_dir)
    tokenizer.set_tool_prompt("none")
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    assert tokenizer.encode_chat(chat, [WEATHER_TOOL]).text == tokenizer.encode_chat(chat).text
    with pytest.raises(ValueError, match="auto, hermes, none"):
        tokenizer.set_tool_prompt("sometimes")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_rewrite_is_what_qwen25_writes(
    qwen_pair,  # noqa: F811
    add_generation_prompt: bool,
) -> None:
    """Forced onto Qwen2.5's template (rendered then without tools), the rewrite gives the
    template's own tool prompt byte for byte: the format the model family was trained on."""
    ours, hf = qwen_pair
    assert ours.renders_tools and not ours.uses_tool_prompt
    expected = hf.apply_chat_template(
        TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours.set_tool_prompt("hermes")
    try:
        got = ours.encode_chat(
            TOOL_CHAT, [WEATHER_TOOL], add_generation_prompt=add_generation_prompt
        )
    finally:
        ours.set_tool_prompt("auto")
    assert got.text == expected
    assert got.token_ids == hf.encode(expected, add_special_tokens=False)


def test_rewrite_details() -> None:
    before = copy.deepcopy(TOOL_CHAT)
    out = with_tool_prompt(TOOL_CHAT, [WEATHER_TOOL])
    assert before == TOOL_CHAT  # not modified
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert all("tool_calls" not in m for m in out)
    # no system message: one is added; arguments that are not JSON stay as sent
    chat = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": "Calling.",
            "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}],
        },
    ]
    out = with_tool_prompt(chat, [WEATHER_TOOL])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("# Tools")
    assert (
        out[2]["content"]
        == 'Calling.\n<tool_call>\n{"name": "f", "arguments": not json}\n</tool_call>'
    )
    assert needs_tool_prompt(chat, None) and not needs_tool_prompt(chat[:1], None)


def test_template_probe() -> None:
    def ignores(chat, tools):
        return "".join(m["content"] for m in chat)

    def renders(chat, tools):
        return ignores(chat, tools) + "".join(t["function"]["name"] for t in tools or [])

    assert not template_renders_tools(ignores)
    assert template_renders_tools(renders)
