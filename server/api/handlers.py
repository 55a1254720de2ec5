"""The OpenAI-compatible endpoints: request JSON -> engine request; engine deltas -> JSON / SSE.

`build_router(state)` returns a Router with /v1/chat/completions, /v1/completions, /v1/models,
/v1/models/{id}, /health, /metrics, /tokenize and /detokenize. The engine is reached only through
the EngineClient protocol (server/api/engine_client.py). Requests are parsed by
server/api/protocol.py, turned into prompt ids and SamplingParams by server/api/prompts.py, and
one request's engine streams are driven by server/api/generation.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from model.errors import RequestRejected
from model.sampling_params import SamplingParams, check_token_ids
from server.api.anthropic import add_anthropic_routes
from server.api.engine_client import EngineClient
from server.api.fields import rejected
from server.api.generation import Generation, GenerationEvents, collect
from server.api.metrics import ServerMetrics
from server.api.outputs import ChatOutput, CompletionOutput, Output
from server.api.prompts import chat_prompt, completion_prompts, encode_chat, resolve_params
from server.api.protocol import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from server.api.responses import ResponsesAPI
from server.api.structured import compile_structured
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
    engine: EngineClient | None = None  # model.engine.async_engine.AsyncEngine; None: loading
    max_n: int = 16
    server: Any = None  # the HTTPServer, whose is_draining turns /health and new requests to 503
    draining: bool = False  # set on shutdown when no server object is at hand
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str = "fp_nanoserve"
    retry_after_s: int = 1
    # the Hermes tool prompt: "auto" (when the chat template ignores tools), "hermes", "none"
    tool_prompt: str = "auto"

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")
        if self.tool_prompt not in ("auto", "hermes", "none"):
            raise ValueError("tool_prompt must be auto, hermes or none")

    def is_draining(self, request: Request | None = None) -> bool:
        servers = (self.server, getattr(request, "server", None))
        return self.draining or any(getattr(s, "is_draining", False) for s in servers)


def engine_request_id(prefix: str, request: Request) -> str:
    """The response `id` and engine request id, derived from the HTTP request id.

    A client's X-Request-Id may repeat (the engine refuses a running duplicate), so an
    echoed one gets a random suffix; the server's own ids are uuid4 hex, unique already.
    """
    request_id = request.request_id
    if request.headers.get("x-request-id") == request_id:
        return f"{prefix}-{request_id}-{uuid.uuid4().hex[:12]}"
    return f"{prefix}-{request_id}"


class OpenAIAPI:
    def __init__(self, state: APIState) -> None:
        self.state = state

    # ---- helpers ---------------------------------------------------------------------------

    def _engine(self, request: Request) -> EngineClient:
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

    async def _run(
        self,
        request: Request,
        engine: EngineClient,
        output: Output,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        stream: bool,
    ) -> Response | EventSourceResponse:
        ids = (
            [request_id]
            if len(prompts) == 1
            else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        gen = Generation(engine, request, ids, output, self.state.retry_after_s)
        await gen.start(prompts, params)
        if stream:
            return output.event_source(GenerationEvents(gen))
        collecting = asyncio.ensure_future(collect(gen))
        try:
            await asyncio.wait({collecting, gen.disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not collecting.done():  # the client left (or shutdown cancelled us): stop waiting
                collecting.cancel()
                await asyncio.gather(collecting, return_exceptions=True)
        if collecting.cancelled():
            raise HTTPError(499, "Client disconnected.")
        return JSONResponse(collecting.result())

    # ---- generation endpoints --------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response | EventSourceResponse:
        tracker = self.state.metrics.tracker()
        engine = self._engine(request)
        req = parse_chat_request(request.json(), self.state.max_n)
        model = self._model(req.model)
        prompt_ids = chat_prompt(engine.tokenizer, req)
        sampling = await compile_structured(engine, req.sampling, req.structured)
        params = resolve_params(engine, [prompt_ids], sampling, "messages")
        request_id = engine_request_id("chatcmpl", request)
        output = ChatOutput(
            req, engine.tokenizer, self._meta(request_id, model), [len(prompt_ids)], tracker
        )
        return await self._run(
            request, engine, output, request_id, [prompt_ids], params, req.stream
        )

    async def completions(self, request: Request) -> Response | EventSourceResponse:
        tracker = self.state.metrics.tracker()
        engine = self._engine(request)
        req = parse_completion_request(request.json(), self.state.max_n)
        model = self._model(req.model)
        prompts, echo_texts = completion_prompts(engine, req)
        sampling = await compile_structured(engine, req.sampling, req.structured)
        params = resolve_params(engine, prompts, sampling, "prompt")
        request_id = engine_request_id("cmpl", request)
        output = CompletionOutput(
            req,
            engine.tokenizer,
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
        self._engine(request)  # 503 until the model is ready, so a readiness probe waits
        data = [self._model_card(n) for n in self.state.served_model_names]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        self._engine(request)
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
            tokens = encode_chat(
                tokenizer,
                req.messages,
                req.tools,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
                req.add_special_tokens,
            )
        else:
            tokens = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
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
        try:
            check_token_ids(req.tokens, engine.model_config.vocab_size, "tokens")
        except RequestRejected as exc:
            raise rejected(exc) from None
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
    router.add("GET", "/health", api.health, public=True)
    router.add("GET", "/metrics", api.metrics, public=True)
    router.add("POST", "/tokenize", api.tokenize)
    router.add("POST", "/detokenize", api.detokenize)
    add_anthropic_routes(router, api, engine_request_id)
    router.add("POST", "/v1/responses", ResponsesAPI(api).create)
    return router
