"""Requests -> prompt token ids and the engine's SamplingParams, checked once before generate.

Chat messages are rendered with the model's chat template and encoded so that client text stays
text (special-token strings in a message never become control tokens: model/text/chat_prompt.py); completion prompts are encoded or taken as token ids. Then
`resolve_params` runs the one context check and fills max_tokens per prompt. The checks
themselves are owned by model.sampling_params (the engine runs the same ones); their
RequestRejected becomes the 400 naming the field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from model.errors import RequestRejected, TemplateError
from model.sampling_params import SamplingParams, check_prompt_ids, resolve_max_tokens
from server.api.engine_client import EngineClient, Tokenizer
from server.api.fields import bad_request, rejected
from server.api.protocol import ChatCompletionRequest, CompletionRequest


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any],
    add_special_tokens: bool = False,
) -> list[int]:
    """The chat template's prompt as token ids, client text encoded as text; a template that
    fails is the client's 400 (param messages)."""
    try:
        prompt = tokenizer.encode_chat(
            messages,
            tools,
            add_generation_prompt,
            continue_final_message,
            template_kwargs,
            add_special_tokens,
        )
    except TemplateError as exc:
        raise bad_request("messages", f"The chat template failed: {exc}") from None
    return prompt.token_ids


def chat_prompt(tokenizer: Tokenizer, req: ChatCompletionRequest) -> list[int]:
    tools = req.tools if req.tool_choice != "none" else None
    return encode_chat(
        tokenizer,
        req.messages,
        tools,
        req.add_generation_prompt,
        req.continue_final_message,
        req.chat_template_kwargs,
    )


def completion_prompts(
    engine: EngineClient, req: CompletionRequest
) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids, and the texts `echo` repeats (empty without echo)."""
    tokenizer = engine.tokenizer
    vocab_size = engine.model_config.vocab_size
    prompts: list[list[int]] = []
    echo_texts: list[str] = []
    for i, prompt in enumerate(req.prompts):
        param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = prompt
        try:
            check_prompt_ids(ids, vocab_size, param)
        except RequestRejected as exc:
            raise rejected(exc) from None
        if req.echo:
            echo_texts.append(
                prompt
                if isinstance(prompt, str)
                else tokenizer.decode(ids, skip_special_tokens=False)
            )
        prompts.append(ids)
    return prompts, echo_texts


def resolve_params(
    engine: EngineClient, prompts: list[list[int]], params: SamplingParams, noun: str
) -> list[SamplingParams]:
    """One SamplingParams per prompt with max_tokens filled in: 400 when a prompt and its
    completion do not fit the context (`noun`, "messages" or "prompt", is the field to
    shorten) or a stop_token_ids / logit_bias id is outside the vocabulary."""
    try:
        budgets = [
            resolve_max_tokens(
                len(ids), params.max_tokens, params.min_tokens, engine.max_model_len, noun
            )
            for ids in prompts
        ]
        params.check_token_ids(engine.model_config.vocab_size)
    except RequestRejected as exc:
        raise rejected(exc) from None
    return [replace(params, max_tokens=budget) for budget in budgets]
