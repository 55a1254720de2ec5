"""ModelConfig.from_dir: supported architectures, both rope layouts, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.config import ModelConfig
from model.errors import ModelLoadError

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_config(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_llama_transformers4_layout(tmp_path):
    config = ModelConfig.from_dir(write_config(tmp_path, LLAMA))
    assert config.architecture == "LlamaForCausalLM"
    assert config.head_dim == 64 and config.num_kv_groups == 3
    assert config.rope_theta == 100000 and config.rope_scaling is None
    assert config.tie_word_embeddings and not config.attention_bias and not config.qk_norm
    assert config.torch_dtype == "bfloat16"
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_llama3_scaling_old_and_new_layout(tmp_path):
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = {**LLAMA, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    new = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    new["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}
    new["dtype"] = new.pop("torch_dtype")
    for raw in (old, new):
        config = ModelConfig.from_dir(write_config(tmp_path, raw))
        assert config.rope_theta == 500000.0
        assert config.rope_scaling == {"rope_type": "llama3", **scaling}
        assert config.torch_dtype == "bfloat16"


@pytest.mark.parametrize(
    "rope", [None, {"rope_type": "default", "rope_theta": 7.0}, {"type": "linear", "factor": 2.0}]
)
def test_rope_variants(tmp_path, rope):
    config = ModelConfig.from_dir(write_config(tmp_path, {**LLAMA, "rope_scaling": rope}))
    if rope is None:
        assert config.rope_scaling is None
    elif rope.get("type") == "linear":
        assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    else:
        assert config.rope_scaling is None and config.rope_theta == 7.0


def test_qwen2_has_qkv_bias_only(tmp_path):
    raw = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    config = ModelConfig.from_dir(write_config(tmp_path, raw))
    assert config.attention_bias and not config.o_proj_bias and not config.qk_norm


def test_qwen3_head_dim_and_qk_norm(tmp_path):
    raw = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_size": 1024}
    raw["num_attention_heads"], raw["num_key_value_heads"] = 16, 8
    config = ModelConfig.from_dir(write_config(tmp_path, raw))
    assert config.head_dim == 128 and config.qk_norm and not config.attention_bias


def test_model_type_fallback(tmp_path):
    raw = {k: v for k, v in LLAMA.items() if k != "architectures"}
    raw["model_type"] = "mistral"
    assert ModelConfig.from_dir(write_config(tmp_path, raw)).architecture == "MistralForCausalLM"


def test_mistral_sliding_window_caps_positions(tmp_path):
    raw = {**LLAMA, "architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768}
    config = ModelConfig.from_dir(write_config(tmp_path, {**raw, "sliding_window": 4096}))
    assert config.max_position_embeddings == 4096
    config = ModelConfig.from_dir(write_config(tmp_path, {**raw, "sliding_window": None}))
    assert config.max_position_embeddings == 32768
    qwen = {**raw, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096}
    assert ModelConfig.from_dir(write_config(tmp_path, qwen)).max_position_embeddings == 32768


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json: not found"):
        ModelConfig.from_dir(tmp_path)


def test_broken_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: cannot read JSON"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"architectures": None, "model_type": "gpt2"}, "unknown architecture"),
        ({"hidden_size": -4}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": "30"}, "num_hidden_layers must be a positive integer"),
        ({"num_key_value_heads": 4}, "not a multiple of num_key_value_heads"),
        ({"hidden_size": 577}, "not a multiple of num_attention_heads"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "unsupported rope_scaling type 'yarn'",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"rope_scaling\['low_freq_factor'\]",
        ),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"torch_dtype": "int8"}, "torch_dtype must be one of"),
        ({"vocab_size": None}, "vocab_size must be a positive integer"),
    ],
)
def test_bad_values(tmp_path, change, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        ModelConfig.from_dir(write_config(tmp_path, {**LLAMA, **change}))
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_missing_required_field(tmp_path):
    raw = {k: v for k, v in LLAMA.items() if k != "intermediate_size"}
    with pytest.raises(ModelLoadError, match="missing required field 'intermediate_size'"):
        ModelConfig.from_dir(write_config(tmp_path, raw))
