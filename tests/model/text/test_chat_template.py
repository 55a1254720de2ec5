"""Chat templates: parity with transformers' apply_chat_template, and the sandbox."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.errors import TemplateError
from model.text.chat_template import render_chat_template
from model.text.tokenizer import Tokenizer

# The chat template of Qwen2.5-Instruct (tools in the system turn, tool calls, tool responses).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — «quoted» ünïcode",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count to 3 — en français, s'il te plaît 🙂"},
    ],
    [
        {"role": "user", "content": "  spaces  \n\nand lines\n"},
        {"role": "assistant", "content": "ok"},
    ],
]

TOOL_CHAT = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            },
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Lyon"}},
            },
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 23}'},
    {"role": "assistant", "content": "Paris 21°C, Lyon 23°C."},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def default_pair(default_model_dir: Path):
    from transformers import AutoTokenizer

    return Tokenizer.from_dir(default_model_dir), AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def qwen_pair(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen25")
    shutil.copy(default_model_dir / "tokenizer.json", folder / "tokenizer.json")
    config = {
        "chat_template": QWEN25_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat_index", range(len(CHATS)))
def test_default_model_template_matches_hf(
    default_pair, chat_index: int, add_generation_prompt: bool
) -> None:
    ours, hf = default_pair
    chat = CHATS[chat_index]
    expected = hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


def test_continue_final_message_matches_hf(default_pair) -> None:
    ours, hf = default_pair
    chat = [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Autumn moonlight —"},
    ]
    expected = hf.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert expected.endswith("Autumn moonlight —")
    assert ours.apply_chat_template(chat, continue_final_message=True) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_system", [True, False])
def test_qwen25_template_with_tools_matches_hf(
    qwen_pair, with_system: bool, add_generation_prompt: bool
) -> None:
    ours, hf = qwen_pair
    chat = TOOL_CHAT if with_system else TOOL_CHAT[1:]
    kwargs = {"tools": [WEATHER_TOOL], "add_generation_prompt": add_generation_prompt}
    expected = hf.apply_chat_template(chat, tokenize=False, **kwargs)
    assert "<tools>" in expected and "<tool_response>" in expected
    assert ours.apply_chat_template(chat, **kwargs) == expected


def test_qwen25_template_without_tools_matches_hf(qwen_pair) -> None:
    ours, hf = qwen_pair
    for chat in CHATS:
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(chat) == expected


def test_filters_globals_and_extras_match_hf(default_pair) -> None:
    _, hf = default_pair
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|{{ tools | tojson(indent=2) }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
        "{% endfor %}|{{ enable_thinking }}|{% generation %}gen{% endgeneration %}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}|{{ dict(a=1) | tojson }}|{{ strftime_now('%Y') | length }}"
    )
    chat = [{"role": "user", "content": "é <b>&</b>"}, {"role": "assistant", "content": "x"}]
    expected = hf.apply_chat_template(
        chat, chat_template=template, tools=[WEATHER_TOOL], tokenize=False, enable_thinking=False
    )
    got = render_chat_template(
        template,
        chat,
        tools=[WEATHER_TOOL],
        add_generation_prompt=False,
        variables={
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "enable_thinking": False,
        },
    )
    assert got == expected
    assert '"é <b>&</b>"' in got  # tojson keeps non-ASCII and HTML characters as they are


def test_raise_exception_and_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="Only user and assistant"):
        render_chat_template("{{ raise_exception('Only user and assistant roles') }}", [])
    with pytest.raises(TemplateError, match="does not compile"):
        render_chat_template("{% for %}", [])
    with pytest.raises(TemplateError, match="failed"):
        render_chat_template("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "a"}])
    with pytest.raises(TemplateError, match="failed"):
        render_chat_template("{{ messages[5].content.upper() }}", [])


def test_model_without_template(default_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(default_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TemplateError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ joiner().__call__.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ namespace.__init__.__globals__ }}",
        "{% set ns = namespace(_x=1) %}",
        "{{ messages.append({'role': 'user'}) }}",
        "{{ messages[0].update({'content': 'x'}) }}",
        "{{ raise_exception.__globals__ }}",
        "{{ ('a' * 10000) * 10000 }}",
        "{{ 2 ** 100000000 }}",
        "{{ range(3).__class__.__base__ }}",
        "{{ ''|attr('__class__') }}",
        "{{ '{0.__class__}'.format('') }}",
    ],
)
def test_sandbox_escapes_are_template_errors(template: str) -> None:
    with pytest.raises(TemplateError):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_messages_are_not_modified() -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    snapshot = json.dumps(chat)
    render_chat_template(
        "{% for m in messages %}{{ m.content }}{% endfor %}", chat, continue_final_message=True
    )
    assert json.dumps(chat) == snapshot
