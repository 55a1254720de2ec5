"""AsyncEngine and the tests' FakeEngine both satisfy EngineClient, member by member.

Methods must match the protocol's parameter names, kinds and which have defaults; attributes
must exist; the tokenizer, deltas, logprobs and stats each engine hands over must carry what
the protocol names. A change on either side that the other lacks fails here, so the fake the
API tests run against cannot drift from the real engine.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from model.engine.async_engine import AsyncEngine
from model.engine.outputs import EngineStats, GenerationDelta, PromptLogprob
from model.sample.metadata import TokenLogprobs
from model.text.tokenizer import Tokenizer
from server.api import engine_client
from tests.server.fake_engine import (
    FakeDelta,
    FakeEngine,
    FakeLogprob,
    FakePromptLogprob,
    FakeTokenizer,
)


def methods(protocol: type) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("_")
    }


def attributes(protocol: type) -> set[str]:
    return set(vars(protocol).get("__annotations__", {}))


def shape(function: object) -> list[tuple[str, inspect._ParameterKind, bool]]:
    params = inspect.signature(function).parameters.values()
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in params]


def assert_satisfies(obj: object, protocol: type) -> None:
    for name, expected in methods(protocol).items():
        actual = getattr(type(obj), name, None)
        assert callable(actual), f"{type(obj).__name__} lacks {name}()"
        assert shape(actual) == shape(expected), f"{type(obj).__name__}.{name}: signature differs"
    for name in attributes(protocol):
        assert hasattr(obj, name), f"{type(obj).__name__} lacks .{name}"


def async_engine() -> AsyncEngine:
    """An AsyncEngine around a stand-in LLMEngine (no model: its attributes are what count)."""
    core = SimpleNamespace(
        tokenizer=FakeTokenizer(),
        model_config=SimpleNamespace(vocab_size=300),
        max_model_len=64,
        config=SimpleNamespace(max_queued_requests=4),
        stats=EngineStats,
    )
    return AsyncEngine(core)


def test_protocols_name_members():
    assert set(methods(engine_client.EngineClient)) == {
        "generate",
        "abort",
        "stats",
        "grammar_compiler",
    }
    assert attributes(engine_client.EngineClient) == {"tokenizer", "model_config", "max_model_len"}
    assert set(methods(engine_client.Tokenizer)) == {
        "encode",
        "decode",
        "token_text",
        "token_bytes",
        "encode_chat",
    }


@pytest.mark.parametrize("make", [async_engine, FakeEngine], ids=["AsyncEngine", "FakeEngine"])
def test_engines_satisfy_engine_client(make):
    engine = make()
    assert_satisfies(engine, engine_client.EngineClient)
    assert isinstance(engine.max_model_len, int)
    assert_satisfies(engine.model_config, engine_client.ModelConfig)
    assert_satisfies(engine.stats(), engine_client.EngineStats)


@pytest.mark.parametrize("tokenizer_type", [Tokenizer, FakeTokenizer])
def test_tokenizers_satisfy_tokenizer(tokenizer_type):
    # LLMEngine (so AsyncEngine) hands over a model.text.tokenizer.Tokenizer.
    for name, expected in methods(engine_client.Tokenizer).items():
        actual = getattr(tokenizer_type, name, None)
        assert callable(actual), f"{tokenizer_type.__name__} lacks {name}()"
        assert shape(actual) == shape(expected), f"{tokenizer_type.__name__}.{name} differs"


@pytest.mark.parametrize(
    ("protocol", "types"),
    [
        (engine_client.GenerationDelta, [GenerationDelta, FakeDelta]),
        (engine_client.TokenLogprobs, [TokenLogprobs, FakeLogprob]),
        (engine_client.PromptLogprob, [PromptLogprob, FakePromptLogprob]),
    ],
)
def test_deltas_carry_what_the_api_reads(protocol, types):
    for data_type in types:
        fields = {f.name for f in dataclasses.fields(data_type)}
        missing = attributes(protocol) - fields
        assert not missing, f"{data_type.__name__} lacks {sorted(missing)}"


def test_fake_delta_fields_match_the_engine():
    assert [f.name for f in dataclasses.fields(FakeDelta)] == [
        f.name for f in dataclasses.fields(GenerationDelta)
    ]


def test_api_layer_loads_no_torch():
    # server.api may import the torch-free model leaves only (model.sampling_params, errors).
    code = "import sys, server.api.handlers; assert 'torch' not in sys.modules, 'torch loaded'"
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=root)
