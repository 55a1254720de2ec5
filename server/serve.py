"""`nanoserve serve`: bind first, load the model in the background, then serve the API."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from server.api.handlers import APIState, build_router
from server.http.config import ServerConfig
from server.http.routing import Router
from server.http.server import run_server
from server.webui.routes import add_webui_routes

if TYPE_CHECKING:
    from model.engine.config import EngineConfig

logger = logging.getLogger("nanoserve")


def serve(
    engine_config: EngineConfig, server_config: ServerConfig, state: APIState, webui: bool = True
) -> int:
    """Serve `state`'s API (and the chat page at / unless not `webui`) on server_config's
    address; the engine loads once the socket is bound."""
    model_dir = engine_config.model_dir
    model_name = state.served_model_names[0]
    router = build_router(state, Router())
    if webui:
        add_webui_routes(router)
    failure: list[int] = []

    async def on_startup() -> None:
        from model.engine.async_engine import AsyncEngine
        from model.errors import ModelLoadError

        logger.info("loading %s on %s ...", model_dir, engine_config.device)
        try:
            async_engine = await AsyncEngine.launch(engine_config)
        except (ModelLoadError, ValueError) as exc:
            print(f"nanoserve: error: {exc}", file=sys.stderr)
            failure.append(2)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        async_engine.tokenizer.set_tool_prompt(state.tool_prompt)
        state.engine = async_engine
        engine = async_engine.engine
        print_summary(engine, model_name, server_config, engine.load_time_s, webui)

    async def on_shutdown() -> None:
        if state.engine is not None:
            await state.engine.shutdown()

    code = run_server(router, server_config, on_startup, on_shutdown)
    return failure[0] if failure else code


def tools_summary(tokenizer) -> str:
    if tokenizer.uses_tool_prompt:
        why = "the chat template ignores tools" if not tokenizer.renders_tools else "--tool-prompt"
        return f"Hermes tool prompt added by nanoserve ({why})"
    if tokenizer.renders_tools:
        return "rendered by the chat template"
    return "not shown to the model (the chat template ignores them; --tool-prompt none)"


def print_summary(
    engine, model_name: str, config: ServerConfig, load_time_s: float, webui: bool = True
) -> None:
    cfg = engine.config
    kv_tokens = engine.num_kv_tokens
    host = f"[{config.host}]" if ":" in config.host else config.host
    driver = engine.runner.driver  # rank 0 of a tensor-parallel group, or None
    tensor_parallel = (
        f", tensor parallel over {cfg.tensor_parallel_size} ranks ({driver.backend})"
        if driver
        else ""
    )
    lines = [
        f"nanoserve ready in {load_time_s:.1f} s",
        f"  model        {model_name} ({engine.model_config.architecture}, "
        f"{engine.model_config.num_hidden_layers} layers)",
        f"  device       {cfg.device}, {cfg.dtype}, attention backend {cfg.attn_backend}"
        + (", oneDNN-packed linear layers" if engine.runner.packed_weights else "")
        + (f", {engine.runner.quantized_weights}" if engine.runner.quantized_weights else "")
        + (
            f", one sequence's decode step compiled ({engine.runner.lone_decode.compile_s:.0f} s)"
            if engine.runner.lone_decode
            else ""
        )
        + tensor_parallel,
        f"  KV cache     {kv_tokens} tokens in {engine.runner.num_blocks} blocks of "
        f"{cfg.block_size}; prefix caching {'on' if cfg.enable_prefix_caching else 'off'}",
        f"  context      {engine.max_model_len} tokens; up to {cfg.max_num_seqs} sequences, "
        f"{cfg.max_num_batched_tokens} tokens per step",
        f"  tools        {tools_summary(engine.tokenizer)}",
        f"  listening    http://{host}:{config.port}/v1"
        + ("  (API key required)" if config.api_key else ""),
    ]
    if webui:
        lines.append(f"  chat page    http://{host}:{config.port}/")
    print("\n".join(lines), file=sys.stderr, flush=True)
    logger.debug("summary printed at %.3f", time.monotonic())
