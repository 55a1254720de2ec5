"""OpenAI request bodies -> validated dataclasses (response shapes: server/api/outputs.py).

Every bad field raises `HTTPError(400, ..., param=<field>)`; `null` counts as absent and
unknown fields are ignored (clients send extras). The sampling fields of both endpoints parse
straight into the engine's `SamplingParams` (model.sampling_params: no torch). Chat's
max_tokens stays None until server/api/prompts.py resolves it against the prompt (the rest of
the context); completions default to 16, as OpenAI and vLLM do. Scoring: completions' `echo`
with `logprobs` k also reports the prompt tokens' logprobs (top k), `max_tokens` 0 with `echo`
scores without generating, and vLLM's `prompt_logprobs` k (both endpoints, not streamed) asks
for vLLM's per-prompt-token dicts; the engine gets the larger k as SamplingParams.prompt_logprobs.
Chat
messages and tools are checked in server/api/chat_messages.py, typed field reads live in
server/api/fields.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.errors import RequestRejected
from model.sampling_params import (
    MAX_LOGPROBS,
    SamplingParams,
    check_min_tokens,
    is_int,
    is_number,
)
from server.api.chat_messages import (
    parse_messages,
    parse_template_kwargs,
    parse_tool_choice,
    parse_tools,
)
from server.api.fields import Fields, bad_request, rejected
from server.api.structured import StructuredRequest, parse_structured, tool_call_request

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# /v1/completions' max_tokens when the request has none (OpenAI's and vLLM's default).
COMPLETION_DEFAULT_MAX_TOKENS = 16


# ---- sampling fields shared by both endpoints ------------------------------------------------


def parse_sampling(
    f: Fields,
    max_n: int,
    logprobs: int | None,
    max_tokens_name: str,
    prompt_logprobs: int | None = None,
    max_tokens_default: int | None = None,
    max_tokens_min: int = 1,
) -> SamplingParams:
    """The sampling fields, read in this order (the first bad one is the 400)."""
    values: dict[str, Any] = {
        "n": f.int("n", 1, 1, max_n),
        "max_tokens": f.int(max_tokens_name, max_tokens_default, max_tokens_min),
        "temperature": f.number("temperature", 1.0, 0.0, 2.0),
        "top_p": f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        "top_k": f.int("top_k", 0, -1),
        "min_p": f.number("min_p", 0.0, 0.0, 1.0),
        "frequency_penalty": f.number("frequency_penalty", 0.0, -2.0, 2.0),
        "presence_penalty": f.number("presence_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": f.number("repetition_penalty", 1.0, 0.0, None, lo_open=True),
        "seed": f.int("seed", None, _INT64_MIN, _INT64_MAX),
        "ignore_eos": f.bool("ignore_eos", False),
        "min_tokens": f.int("min_tokens", 0, 0),
    }
    try:
        check_min_tokens(values["min_tokens"], values["max_tokens"], max_tokens_name)
    except RequestRejected as exc:
        raise rejected(exc) from None
    values["include_stop_str_in_output"] = f.bool("include_stop_str_in_output", False)
    values["skip_special_tokens"] = f.bool("skip_special_tokens", True)
    values["stop"] = _parse_stop(f.get("stop"))
    values["stop_token_ids"] = _parse_token_ids(
        f.get("stop_token_ids"), "stop_token_ids", allow_empty=True
    )
    values["logit_bias"] = _parse_logit_bias(f.get("logit_bias"))
    f.str("user")  # accepted, unused
    try:
        return SamplingParams(logprobs=logprobs, prompt_logprobs=prompt_logprobs, **values)
    except RequestRejected as exc:  # the reads above are stricter; a gap is still a 400
        raise rejected(exc) from None


def _parse_stop(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop", "'stop' must be a string or an array of strings.")
    if any(not s for s in stops):
        raise bad_request("stop", "'stop' strings must not be empty.")
    return list(stops)


def _parse_token_ids(value: object, param: str, allow_empty: bool) -> list[int]:
    if value is None and allow_empty:
        return []
    if not isinstance(value, list) or not all(is_int(t) and t >= 0 for t in value):
        raise bad_request(param, f"'{param}' must be an array of token ids (integers >= 0).")
    if not value and not allow_empty:
        raise bad_request(param, f"'{param}' must not be empty.")
    return list(value)


def _parse_logit_bias(value: object) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("logit_bias", "'logit_bias' must be an object of token id -> bias.")
    bias: dict[int, float] = {}
    for key, b in value.items():
        if not (key.isascii() and key.isdigit()):
            raise bad_request("logit_bias", f"logit_bias key {key!r} is not a token id.")
        token_id = int(key)
        if not is_number(b) or not -100 <= b <= 100:
            raise bad_request("logit_bias", f"logit_bias[{key}] must be a number in [-100, 100].")
        bias[token_id] = float(b)
    return bias or None


def _parse_prompt_logprobs(f: Fields, stream: bool) -> int | None:
    """vLLM's `prompt_logprobs`: null, or the top-k to list per prompt token (non-streaming)."""
    prompt_logprobs = f.int("prompt_logprobs", None, 0, MAX_LOGPROBS)
    if prompt_logprobs is not None and stream:
        raise bad_request(
            "prompt_logprobs", "'prompt_logprobs' is not available when 'stream' is true."
        )
    return prompt_logprobs


def _parse_stream(f: Fields) -> tuple[bool, bool]:
    stream = f.bool("stream", False)
    options = f.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad_request(
            "stream_options", "'stream_options' is only allowed when 'stream' is true."
        )
    if not isinstance(options, dict):
        raise bad_request("stream_options", "'stream_options' must be an object.")
    return stream, Fields(options, "stream_options.").bool("include_usage", False)


# ---- requests --------------------------------------------------------------------------------


@dataclass
class ChatCompletionRequest:
    model: str | None
    messages: list[dict[str, Any]]  # validated, in the chat template's shape
    sampling: SamplingParams  # max_tokens None: the rest of the context
    max_tokens_param: str = "max_tokens"  # the field that set max_tokens, for error messages
    stream: bool = False
    include_usage: bool = False
    tools: list[dict[str, Any]] | None = None  # passed to the template unless tool_choice is none
    tool_choice: str = "none"  # "none" | "auto" | "required" | "function" (named: tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    structured: StructuredRequest | None = None  # the output constraint, compiled before admission
    prompt_logprobs: int | None = None  # vLLM's extra: per prompt token, the token plus top-k
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def logprobs(self) -> bool:
        return self.sampling.logprobs is not None

    @property
    def parses_tool_calls(self) -> bool:
        return self.tools is not None and self.tool_choice != "none"

    @property
    def tool_names(self) -> set[str]:
        """The functions a parsed call may name (under "auto" other names stay text)."""
        return {t["function"]["name"] for t in self.tools or ()}


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # each: text, or token ids
    sampling: SamplingParams  # max_tokens 0: score only (with echo)
    max_tokens_param: str = "max_tokens"  # the field that set max_tokens, for error messages
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    add_special_tokens: bool = True
    structured: StructuredRequest | None = None  # the output constraint, compiled before admission
    prompt_logprobs: int | None = None  # vLLM's extra: per prompt token, the token plus top-k

    @property
    def echo_logprobs(self) -> bool:
        """The legacy logprobs cover the echoed prompt too."""
        return self.echo and self.sampling.logprobs is not None


@dataclass
class TokenizeRequest:
    model: str | None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DetokenizeRequest:
    model: str | None
    tokens: list[int]


def _object(body: object) -> Fields:
    if not isinstance(body, dict):
        raise bad_request(None, "The request body must be a JSON object.")
    return Fields(body)


def parse_chat_request(body: object, max_n: int) -> ChatCompletionRequest:
    f = _object(body)
    messages = parse_messages(f.get("messages"))
    wants_logprobs = f.bool("logprobs", False)
    top_logprobs = f.int("top_logprobs", None, 0, MAX_LOGPROBS)
    if top_logprobs is not None and not wants_logprobs:
        raise bad_request("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
    logprobs = (top_logprobs or 0) if wants_logprobs else None
    max_tokens_name = (
        "max_completion_tokens" if f.get("max_completion_tokens") is not None else "max_tokens"
    )
    stream, include_usage = _parse_stream(f)
    prompt_logprobs = _parse_prompt_logprobs(f, stream)
    sampling = parse_sampling(f, max_n, logprobs, max_tokens_name, prompt_logprobs)
    structured = parse_structured(f)
    tools = parse_tools(f.get("tools"))
    tool_choice, tool_name = parse_tool_choice(f.get("tool_choice"), tools)
    # False: one call at most (under "required" or a named function the grammar allows one).
    parallel_tool_calls = f.bool("parallel_tool_calls", True)
    if tools is not None:
        forced = tool_call_request(tools, tool_choice, tool_name)
        if forced is not None:
            if structured is not None:
                raise bad_request(
                    structured.param,
                    f"'{structured.param}' cannot be combined with tool_choice {tool_choice!r}.",
                )
            structured = forced
    continue_final = f.bool("continue_final_message", False)
    add_generation_prompt = f.bool("add_generation_prompt", not continue_final)
    if continue_final:
        if add_generation_prompt:
            raise bad_request(
                "continue_final_message",
                "'continue_final_message' and 'add_generation_prompt' cannot both be true.",
            )
        if messages[-1]["role"] != "assistant":
            raise bad_request(
                "continue_final_message",
                "'continue_final_message' needs the last message to be from the assistant.",
            )
    elif messages[-1]["role"] == "assistant":
        raise bad_request(
            "messages",
            "The last message is from the assistant; set 'continue_final_message' to continue it.",
        )
    return ChatCompletionRequest(
        model=f.str("model"),
        messages=messages,
        sampling=sampling,
        max_tokens_param=max_tokens_name,
        stream=stream,
        include_usage=include_usage,
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel_tool_calls,
        structured=structured,
        prompt_logprobs=prompt_logprobs,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        chat_template_kwargs=parse_template_kwargs(f),
    )


def parse_prompts(value: object) -> list[str | list[int]]:
    """A string, strings, token ids, or lists of token ids -> a list of prompts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(is_int(t) for t in value):
            return [_parse_token_ids(value, "prompt", allow_empty=False)]
        if all(isinstance(p, list) for p in value):
            return [_parse_token_ids(p, "prompt", allow_empty=False) for p in value]
    raise bad_request(
        "prompt",
        "'prompt' must be a string, an array of strings, an array of token ids "
        "or an array of arrays of token ids.",
    )


def parse_completion_request(body: object, max_n: int) -> CompletionRequest:
    f = _object(body)
    prompts = parse_prompts(f.get("prompt"))
    logprobs = f.int("logprobs", None, 0, MAX_LOGPROBS)
    echo = f.bool("echo", False)
    stream, include_usage = _parse_stream(f)
    prompt_logprobs = _parse_prompt_logprobs(f, stream)
    # The engine scores the prompt once, with the larger k of the two ways to ask.
    asked = [k for k in (prompt_logprobs, logprobs if echo else None) if k is not None]
    sampling = parse_sampling(
        f,
        max_n,
        logprobs,
        "max_tokens",
        max(asked, default=None),
        max_tokens_default=COMPLETION_DEFAULT_MAX_TOKENS,
        max_tokens_min=0,
    )
    if sampling.max_tokens == 0 and not echo:
        raise bad_request(
            "max_tokens",
            "'max_tokens' 0 generates nothing: it needs 'echo' true (score the prompt only).",
        )
    if f.str("suffix"):
        raise bad_request("suffix", "'suffix' is not supported.")
    best_of = f.int("best_of", None, 1)
    if best_of is not None and best_of != sampling.n:
        raise bad_request("best_of", "'best_of' is not supported (it must equal 'n').")
    structured = parse_structured(f)
    return CompletionRequest(
        model=f.str("model"),
        prompts=prompts,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        echo=echo,
        add_special_tokens=f.bool("add_special_tokens", True),
        structured=structured,
        prompt_logprobs=prompt_logprobs,
    )


def parse_tokenize_request(body: object) -> TokenizeRequest:
    f = _object(body)
    req = TokenizeRequest(model=f.str("model"))
    if f.get("messages") is not None:
        req.messages = parse_messages(f.get("messages"))
        req.tools = parse_tools(f.get("tools"))
        req.continue_final_message = f.bool("continue_final_message", False)
        req.add_generation_prompt = f.bool("add_generation_prompt", not req.continue_final_message)
        req.add_special_tokens = f.bool("add_special_tokens", False)
        req.chat_template_kwargs = parse_template_kwargs(f)
    else:
        req.prompt = f.str("prompt")
        if req.prompt is None:
            raise bad_request("prompt", "Give 'prompt' (a string) or 'messages'.")
        req.add_special_tokens = f.bool("add_special_tokens", True)
    req.return_token_strs = f.bool("return_token_strs", False)
    return req


def parse_detokenize_request(body: object) -> DetokenizeRequest:
    f = _object(body)
    tokens = _parse_token_ids(f.get("tokens"), "tokens", allow_empty=True)
    return DetokenizeRequest(model=f.str("model"), tokens=tokens)
