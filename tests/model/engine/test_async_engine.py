"""AsyncEngine.launch on the default model: loaded and stepped in one thread, errors surface."""

from __future__ import annotations

import asyncio
import threading

import pytest

import model.engine.async_engine as async_engine_module
from model.engine.async_engine import AsyncEngine
from model.engine.config import EngineConfig
from model.engine.llm_engine import LLMEngine
from model.errors import ModelLoadError
from model.sampling_params import SamplingParams


class RecordingEngine(LLMEngine):
    """The real engine; remembers which threads built it and ran its steps."""

    def __init__(self, config: EngineConfig) -> None:
        self.load_thread = threading.get_ident()
        self.step_threads: set[int] = set()
        super().__init__(config)

    def step(self):
        self.step_threads.add(threading.get_ident())
        return super().step()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_launch_loads_and_steps_in_one_thread(default_model_dir, monkeypatch):
    monkeypatch.setattr(async_engine_module, "LLMEngine", RecordingEngine)
    config = EngineConfig(
        model_dir=str(default_model_dir), device="cpu", kv_cache_memory_bytes=64 << 20
    )

    async def main():
        engine = await AsyncEngine.launch(config)
        try:
            prompt = engine.tokenizer.encode("The capital of France is")
            params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
            deltas = [d async for d in engine.generate("r1", prompt, params)]
        finally:
            await engine.shutdown()
        return engine.engine, deltas

    inner, deltas = run(main())
    assert sum(len(d.token_ids) for d in deltas) == 5
    assert deltas[-1].finish_reason == "length"
    assert inner.load_thread != threading.get_ident()
    assert inner.step_threads == {inner.load_thread}


def test_launch_raises_the_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        run(AsyncEngine.launch(EngineConfig(model_dir=str(tmp_path), device="cpu")))
