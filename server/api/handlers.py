"""The OpenAI-compatible endpoints: request JSON -> engine request; engine deltas -> JSON / SSE.

`build_router(state)` returns a Router with /v1/chat/completions, /v1/completions, /v1/models,
/v1/models/{id}, /health, /metrics, /tokenize and /detokenize. The engine is reached only through
the AsyncEngine interface (generate / abort / stats / tokenizer / max_model_len); one
request's engine streams are driven by server/generation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from model.errors import EngineError, RequestRejected, TemplateError
from server.api.generation import Generation, GenerationEvents
from server.api.metrics import ServerMetrics
from server.api.outputs import ChatOutput, CompletionOutput, Output
from server.api.protocol import (
    SamplingFields,
    bad_request,
    check_token_ids,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
    to_sampling_params,
)
from server.http.errors import HTTPError
from server.http.messages import JSONResponse, Request, Response
from server.http.routing import Router
from server.http.sse import EventSourceResponse
from server.prometheus import CONTENT_TYPE

logger = logging.getLogger("nanoserve.api")


@dataclass
class APIState:
    """What the handlers share; the CLI sets `engine` once the model is loaded."""

    served_model_names: list[str]
    engine: Any = None  # model.async_engine.AsyncEngine; None while loading
    max_n: int = 16
    server: Any = None  # the HTTPServer, whose is_draining turns /health and new requests to 503
    draining: bool = False  # set on shutdown when no server object is at hand
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str = "fp_nanoserve"
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")

    def is_draining(self, request: Request | None = None) -> bool:
        servers = (self.server, getattr(request, "server", None))
        return self.draining or any(getattr(s, "is_draining", False) for s in servers)


class OpenAIAPI:
    def __init__(self, state: APIState) -> None:
        self.state = state

    # ---- helpers ---------------------------------------------------------------------------

    def _engine(self, request: Request) -> Any:
        if self.state.is_draining(request):
            raise HTTPError(503, "The server is shutting down.")
        if self.state.engine is None:
            raise HTTPError(503, "The model is still loading; retry shortly.")
        return self.state.engine

    def _model(self, requested: str | None) -> str:
        names = self.state.served_model_names
        if requested is None:
            return names[0]
        if requested not in names:
            raise HTTPError(
                404,
                f"The model '{requested}' does not exist. Served: {', '.join(names)}.",
                param="model",
                code="model_not_found",
            )
        return requested

    @staticmethod
    def _vocab_size(engine: Any) -> int:
        config = getattr(engine, "model_config", None)
        return getattr(config, "vocab_size", None) or engine.tokenizer.vocab_size

    def _max_tokens(self, engine: Any, num_prompt: int, s: SamplingFields, noun: str) -> int:
        """The completion budget; 400 with the context message when it does not fit."""
        limit = engine.max_model_len
        param = "messages" if noun == "messages" else "prompt"
        if s.max_tokens is None:
            if num_prompt >= limit:
                raise bad_request(
                    param,
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"request has {num_prompt} input tokens. Please reduce the length of the "
                    f"{noun}.",
                )
            max_tokens = limit - num_prompt
        else:
            max_tokens = s.max_tokens
            if num_prompt + max_tokens > limit:
                raise bad_request(
                    param,
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the {noun}, "
                    f"{max_tokens} in the completion). Please reduce the length of the {noun} "
                    "or completion.",
                )
        if s.min_tokens > max_tokens:
            raise bad_request("min_tokens", f"min_tokens must be <= {max_tokens} for this prompt.")
        return max_tokens

    def _check_sampling_ids(self, engine: Any, s: SamplingFields) -> None:
        vocab = self._vocab_size(engine)
        check_token_ids(s.stop_token_ids, vocab, "stop_token_ids")
        check_token_ids(list(s.logit_bias or ()), vocab, "logit_bias")

    def _render_chat(
        self, engine: Any, messages, tools, add_generation_prompt, cont, kwargs
    ) -> str:
        try:
            return engine.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=cont,
                **kwargs,
            )
        except TemplateError as exc:
            raise bad_request("messages", f"The chat template failed: {exc}") from None

    async def _run(
        self,
        request: Request,
        engine: Any,
        output: Output,
        request_id: str,
        prompts: list[list[int]],
        params: list[Any],
        stream: bool,
    ) -> Response | EventSourceResponse:
        ids = (
            [request_id]
            if len(prompts) == 1
            else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        gen = Generation(engine, request, ids, self.state.retry_after_s)
        await gen.start(prompts, params)
        if stream:
            return EventSourceResponse(GenerationEvents(self._stream(gen, output), gen, output))
        collect = asyncio.ensure_future(self._collect(gen, output))
        try:
            await asyncio.wait({collect, gen.disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not collect.done():  # the client left (or shutdown cancelled us): stop waiting
                collect.cancel()
                await asyncio.gather(collect, return_exceptions=True)
        if collect.cancelled():
            raise HTTPError(499, "Client disconnected.")
        return JSONResponse(collect.result())

    async def _collect(self, gen: Generation, output: Output) -> dict:
        try:
            async with contextlib.aclosing(gen.deltas()) as deltas:
                async for prompt_index, delta in deltas:
                    output.on_delta(prompt_index, delta)
        except EngineError as exc:
            output.on_error()
            raise HTTPError(500, f"Generation failed: {exc}") from None
        except RequestRejected as exc:
            output.on_error()
            raise HTTPError(400, str(exc), param=exc.param) from None
        except Exception:
            output.on_error()
            raise
        finally:
            await gen.close()
            output.on_closed()
        if output.was_aborted:
            if gen.disconnected.done():
                raise HTTPError(499, "Client disconnected.")
            raise HTTPError(503, "The request was aborted by the server.")
        return output.response()

    async def _stream(self, gen: Generation, output: Output) -> AsyncIterator[Any]:
        try:
            try:
                for chunk in output.first_chunks():
                    yield chunk
                async with contextlib.aclosing(gen.deltas()) as deltas:
                    async for prompt_index, delta in deltas:
                        for chunk in output.on_delta(prompt_index, delta):
                            yield chunk
                usage = output.usage_chunk()
                if usage is not None:
                    yield usage
            except Exception as exc:  # after the headers: report in-stream, then end cleanly
                output.on_error()
                if isinstance(exc, RequestRejected):
                    exc = HTTPError(400, str(exc), param=exc.param)
                elif not isinstance(exc, HTTPError):
                    is_engine = isinstance(exc, EngineError)
                    logger.error("stream failed: %s", exc, exc_info=None if is_engine else exc)
                    exc = HTTPError(500, f"Generation failed: {exc}")
                yield exc.body()
            yield "[DONE]"
        finally:
            await gen.close()
            output.on_closed()

    # ---- generation endpoints --------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response | EventSourceResponse:
        tracker = self.state.metrics.tracker()
        engine = self._engine(request)
        req = parse_chat_request(request.json(), self.state.max_n)
        model = self._model(req.model)
        tools = req.tools if req.tool_choice != "none" else None
        text = self._render_chat(
            engine,
            req.messages,
            tools,
            req.add_generation_prompt,
            req.continue_final_message,
            req.chat_template_kwargs,
        )
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = self._max_tokens(engine, len(prompt_ids), req.sampling, "messages")
        self._check_sampling_ids(engine, req.sampling)
        params = to_sampling_params(req.sampling, max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        output = ChatOutput(
            req, engine.tokenizer, self._meta(request_id, model), [len(prompt_ids)], tracker
        )
        return await self._run(
            request, engine, output, request_id, [prompt_ids], [params], req.stream
        )

    async def completions(self, request: Request) -> Response | EventSourceResponse:
        tracker = self.state.metrics.tracker()
        engine = self._engine(request)
        req = parse_completion_request(request.json(), self.state.max_n)
        model = self._model(req.model)
        tokenizer = engine.tokenizer
        vocab = self._vocab_size(engine)
        prompts: list[list[int]] = []
        echo_texts: list[str] = []
        for i, prompt in enumerate(req.prompts):
            param = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
                if not ids:
                    raise bad_request(param, "The prompt is empty.")
            else:
                check_token_ids(prompt, vocab, param)
                ids = prompt
            if req.echo:
                echo_texts.append(
                    prompt
                    if isinstance(prompt, str)
                    else tokenizer.decode(ids, skip_special_tokens=False)
                )
            prompts.append(ids)
        budgets = [self._max_tokens(engine, len(ids), req.sampling, "prompt") for ids in prompts]
        self._check_sampling_ids(engine, req.sampling)
        params = [to_sampling_params(req.sampling, budget) for budget in budgets]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        output = CompletionOutput(
            req,
            tokenizer,
            self._meta(request_id, model),
            [len(ids) for ids in prompts],
            tracker,
            echo_texts,
        )
        return await self._run(request, engine, output, request_id, prompts, params, req.stream)

    def _meta(self, request_id: str, model: str) -> dict[str, Any]:
        return {
            "id": request_id,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.state.system_fingerprint,
        }

    # ---- other endpoints -------------------------------------------------------------------

    def _model_card(self, name: str) -> dict[str, Any]:
        engine = self.state.engine
        return {
            "id": name,
            "object": "model",
            "created": self.state.created,
            "owned_by": "nanoserve",
            "max_model_len": engine.max_model_len if engine is not None else None,
        }

    async def list_models(self, request: Request) -> Response:
        data = [self._model_card(n) for n in self.state.served_model_names]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        return JSONResponse(self._model_card(self._model(request.path_params["model"])))

    async def health(self, request: Request) -> Response:
        self._engine(request)
        return JSONResponse({})

    async def metrics(self, request: Request) -> Response:
        engine = self.state.engine
        text = self.state.metrics.render(engine.stats() if engine is not None else None)
        return Response(200, text, content_type=CONTENT_TYPE)

    async def tokenize(self, request: Request) -> Response:
        engine = self._engine(request)
        req = parse_tokenize_request(request.json())
        self._model(req.model)
        tokenizer = engine.tokenizer
        if req.messages is not None:
            text = self._render_chat(
                engine,
                req.messages,
                req.tools,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
            )
        else:
            text = req.prompt
        tokens = tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        body: dict[str, Any] = {
            "count": len(tokens),
            "max_model_len": engine.max_model_len,
            "tokens": tokens,
            "token_strs": [tokenizer.token_text(t) for t in tokens]
            if req.return_token_strs
            else None,
        }
        return JSONResponse(body)

    async def detokenize(self, request: Request) -> Response:
        engine = self._engine(request)
        req = parse_detokenize_request(request.json())
        self._model(req.model)
        check_token_ids(req.tokens, self._vocab_size(engine), "tokens")
        return JSONResponse(
            {"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}
        )


def build_router(state: APIState, router: Router | None = None) -> Router:
    """Registers every endpoint on `router` (a new one by default) and returns it."""
    api = OpenAIAPI(state)
    router = router or Router()
    router.add("POST", "/v1/chat/completions", api.chat_completions)
    router.add("POST", "/v1/completions", api.completions)
    router.add("GET", "/v1/models", api.list_models)
    router.add("GET", "/v1/models/{model:path}", api.get_model)
    router.add("GET", "/health", api.health)
    router.add("GET", "/metrics", api.metrics)
    router.add("POST", "/tokenize", api.tokenize)
    router.add("POST", "/detokenize", api.detokenize)
    return router
