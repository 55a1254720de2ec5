"""`nanoserve serve`: bind first, load the model in the background, then serve the API."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from server.api.handlers import APIState, build_router
from server.http.config import ServerConfig
from server.http.routing import Router
from server.http.server import run_server

logger = logging.getLogger("nanoserve")


def serve(args: argparse.Namespace, model_dir: Path) -> int:
    # Imported here so the HTTP side stays importable without torch (python -m server --help).
    from model.config import ModelConfig
    from model.engine.config import EngineConfig
    from model.models.weights import checkpoint_files
    from model.text.tokenizer import Tokenizer

    # Cheap checks first, so a broken folder fails in a second with one line (exit 2).
    ModelConfig.from_dir(model_dir)
    Tokenizer.from_dir(model_dir)
    checkpoint_files(model_dir)
    engine_config = EngineConfig(
        model_dir=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        max_queued_requests=args.max_queued_requests,
        attn_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
    )
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        timeout_keep_alive_s=args.timeout_keep_alive,
        max_connections=args.max_connections,
        shutdown_timeout_s=args.shutdown_timeout,
        sse_ping_interval_s=args.sse_ping_interval,
    )
    model_name = args.served_model_name or model_dir.resolve().name
    state = APIState(served_model_names=[model_name], max_n=args.max_n)
    router = build_router(state, Router())
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
        state.engine = async_engine
        engine = async_engine.engine
        print_summary(engine, model_name, server_config, engine.load_time_s)

    async def on_shutdown() -> None:
        if state.engine is not None:
            await state.engine.shutdown()

    code = run_server(router, server_config, on_startup, on_shutdown)
    return failure[0] if failure else code


def print_summary(engine, model_name: str, config: ServerConfig, load_time_s: float) -> None:
    cfg = engine.config
    kv_tokens = engine.num_kv_tokens
    host = f"[{config.host}]" if ":" in config.host else config.host
    lines = [
        f"nanoserve ready in {load_time_s:.1f} s",
        f"  model        {model_name} ({engine.model_config.architecture}, "
        f"{engine.model_config.num_hidden_layers} layers)",
        f"  device       {cfg.device}, {cfg.dtype}, attention backend {cfg.attn_backend}"
        + (", oneDNN-packed linear layers" if engine.runner.packed_weights else ""),
        f"  KV cache     {kv_tokens} tokens in {engine.runner.num_blocks} blocks of "
        f"{cfg.block_size}; prefix caching {'on' if cfg.enable_prefix_caching else 'off'}",
        f"  context      {engine.max_model_len} tokens; up to {cfg.max_num_seqs} sequences, "
        f"{cfg.max_num_batched_tokens} tokens per step",
        f"  listening    http://{host}:{config.port}/v1"
        + ("  (API key required)" if config.api_key else ""),
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
    logger.debug("summary printed at %.3f", time.monotonic())
