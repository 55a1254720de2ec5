"""Structured outputs through the engine on the default model: valid JSON at temperature 1,
seeded reproducibility in a batch, n > 1, stop strings and the length cut."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model.engine.config import EngineConfig
from model.engine.llm_engine import LLMEngine
from model.sampling_params import SamplingParams
from model.structured import StructuredSpec
from tests.model.structured.corpus import CORPUS

SCHEMAS = ["object-simple", "enum", "ref-defs"]


@pytest.fixture(scope="module")
def engine(default_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(default_model_dir), device="cpu"))


def chat(engine: LLMEngine, text: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def constrained(engine: LLMEngine, spec: StructuredSpec, **kw) -> SamplingParams:
    grammar = engine.grammar_compiler().compile(spec)
    return SamplingParams(structured=grammar, **kw)


def sampled_answers(engine, names: list[str], seeds: range, max_tokens: int) -> tuple[int, int]:
    """Answers at temperature 1 for each schema and seed, in one batch: every one that stopped
    must parse and validate. Returns (answers, answers that stopped)."""
    prompt = chat(engine, "Reply with JSON.")
    params, schemas = [], []
    for name in names:
        spec = StructuredSpec("json_schema", CORPUS[name])
        grammar = engine.grammar_compiler().compile(spec)
        for seed in seeds:
            params.append(
                SamplingParams(
                    structured=grammar, temperature=1.0, seed=seed, max_tokens=max_tokens
                )
            )
            schemas.append((name, CORPUS[name]))
    outs = engine.generate([prompt] * len(params), params)
    num_stopped = 0
    for (delta,), (name, schema) in zip(outs, schemas, strict=True):
        if delta.finish_reason == "stop":
            num_stopped += 1
            try:
                jsonschema.validate(json.loads(delta.text), schema)
            except (ValueError, jsonschema.ValidationError) as exc:
                raise AssertionError(f"{name}: {delta.text!r}: {exc}") from None
        else:
            assert delta.finish_reason == "length"
    return len(params), num_stopped


def test_schemas_give_valid_json_at_temperature_one(engine):
    num, num_stopped = sampled_answers(engine, SCHEMAS, range(1, 3), max_tokens=32)
    assert num_stopped >= num // 2


def test_every_corpus_schema_gives_valid_answers(engine):
    """A few sampled answers per corpus schema (the random walks in tests/model/structured
    cover the automaton; this is the real model choosing among the allowed tokens)."""
    num, num_stopped = sampled_answers(engine, sorted(CORPUS), range(2), max_tokens=48)
    assert num_stopped >= num // 3, f"only {num_stopped} of {num} answers finished"


@pytest.mark.slow
def test_fifty_answers_per_corpus_schema(engine):
    num, num_stopped = sampled_answers(engine, sorted(CORPUS), range(50), max_tokens=96)
    assert num_stopped >= num // 2, f"only {num_stopped} of {num} answers finished"


def test_json_object_and_n_choices(engine):
    prompt = chat(engine, "Describe a cat as a JSON object.")
    params = constrained(
        engine, StructuredSpec("json_object"), n=3, temperature=1.0, seed=5, max_tokens=40
    )
    outs = engine.generate([prompt], params)[0]
    assert sorted(d.choice_index for d in outs) == [0, 1, 2]
    for d in outs:
        if d.finish_reason == "stop":
            assert isinstance(json.loads(d.text), dict)


def test_seeded_constrained_request_same_alone_and_in_batch(engine):
    prompt = chat(engine, "Give a person as JSON.")
    spec = StructuredSpec("json_schema", CORPUS["object-simple"])
    seeded = constrained(engine, spec, temperature=1.0, seed=99, max_tokens=24)
    alone = engine.generate([prompt], seeded)[0][0].token_ids
    busy = [SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True)] * 3
    other = constrained(
        engine, StructuredSpec("regex", "[a-z]{3,9}"), temperature=1.0, max_tokens=8
    )
    prompts = [chat(engine, "Hi"), chat(engine, "Count to ten."), prompt, prompt, prompt]
    outs = engine.generate(prompts, [*busy[:2], other, seeded, busy[2]])
    assert outs[3][0].token_ids == alone


def test_choice_regex_stop_and_length(engine):
    prompt = chat(engine, "Is the sky blue?")
    spec = StructuredSpec("choice", ["yes", "no", "maybe"])
    (d,) = engine.generate([prompt], constrained(engine, spec, temperature=1.0, seed=3))[0]
    assert d.finish_reason == "stop" and d.text in ("yes", "no", "maybe")
    regex = StructuredSpec("regex", "[0-9]{20}")
    (d,) = engine.generate([prompt], constrained(engine, regex, temperature=0.0, max_tokens=3))[0]
    assert d.finish_reason == "length" and d.text.isdigit()
    (d,) = engine.generate(
        [prompt], constrained(engine, StructuredSpec("regex", "ab-cd-ef"), stop=["-"])
    )[0]
    assert d.finish_reason == "stop" and d.stop_reason == "-" and d.text == "ab"
