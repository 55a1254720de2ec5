"""Safetensors loading: sharded, dtypes on disk, tied embeddings, and clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import ModelLoadError
from model.models.loader import load_model

transformers = pytest.importorskip("transformers")

from tests.model.models.test_llama_parity import (  # noqa: E402
    BASE,
    flat_forward,
    hf_logits,
    make_hf_model,
    save_hf_model,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model("llama_gqa_untied")


@pytest.fixture(scope="module")
def prompt():
    rng = random.Random(0)
    return [rng.randrange(BASE["vocab_size"]) for _ in range(9)]


@pytest.fixture
def llama_dir(hf_llama, tmp_path):
    return save_hf_model(hf_llama, tmp_path / "llama")


def edit_tensors(model_dir, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint(hf_llama, prompt, tmp_path):
    path = save_hf_model(hf_llama, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (path / "model.safetensors").exists()
    model, _ = load_model(path)
    (logits,) = flat_forward(model, [prompt])
    assert (logits - hf_logits(hf_llama, prompt)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("disk_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_disk_cast_to_fp32(hf_llama, prompt, tmp_path, disk_dtype):
    path = save_hf_model(make_hf_model("llama_gqa_untied").to(disk_dtype), tmp_path / "half")
    assert load_file(path / "model.safetensors")["model.norm.weight"].dtype == disk_dtype
    model, config = load_model(path, dtype=torch.float32)
    assert config.torch_dtype == str(disk_dtype).removeprefix("torch.")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    (logits,) = flat_forward(model, [prompt])
    # The same rounded weights in fp32 on both sides.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    assert (logits - hf_logits(reference, prompt)).abs().max().item() <= TOLERANCE


def test_tied_embeddings_share_storage(tmp_path):
    path = save_hf_model(make_hf_model("llama_tied_bias"), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model, _ = load_model(path)
    assert model.lm_head is None
    assert model.lm_head_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fused_projections_stack_hf_rows(hf_llama, llama_dir):
    model, config = load_model(llama_dir)
    hf_attn = hf_llama.model.layers[1].self_attn
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    expected = torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight])
    assert torch.equal(qkv, expected)
    hf_mlp = hf_llama.model.layers[0].mlp
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate_up, torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_ignores_rotary_buffers_and_tied_lm_head(tmp_path):
    path = save_hf_model(make_hf_model("llama_tied_bias"), tmp_path / "tied")

    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    edit_tensors(path, add)
    load_model(path)


def test_missing_tensor(llama_dir):
    edit_tensors(llama_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        ModelLoadError, match="missing tensor 'model.layers.1.self_attn.k_proj.weight'"
    ):
        load_model(llama_dir)


def test_missing_untied_lm_head(llama_dir):
    edit_tensors(llama_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="missing tensor 'lm_head.weight'"):
        load_model(llama_dir)


def test_extra_tensor(llama_dir):
    edit_tensors(
        llama_dir, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.ones(2)})
    )
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.7"
    ):
        load_model(llama_dir)


def test_wrong_shape(llama_dir):
    def shrink(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(127, 64)

    edit_tensors(llama_dir, shrink)
    with pytest.raises(
        ModelLoadError,
        match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape \[127, 64\], expected \[128, 64\]",
    ):
        load_model(llama_dir)


def test_integer_tensor_rejected(llama_dir):
    def to_int(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)

    edit_tensors(llama_dir, to_int)
    with pytest.raises(ModelLoadError, match="'model.norm.weight' has unsupported dtype I32"):
        load_model(llama_dir)


def test_no_weights_file(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(
        ModelLoadError, match="no model.safetensors or model.safetensors.index.json"
    ):
        load_model(llama_dir)


def test_corrupt_weights_file(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="model.safetensors: cannot read safetensors"):
        load_model(llama_dir)


def test_index_names_missing_shard(hf_llama, tmp_path):
    path = save_hf_model(hf_llama, tmp_path / "sharded", max_shard_size="40KB")
    next(path.glob("model-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match=r"index\.json: shard model-.* not found"):
        load_model(path)


def test_unknown_architecture_and_missing_config(llama_dir):
    config_path = llama_dir / "config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'FalconForCausalLM'"):
        load_model(llama_dir)
    config_path.unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: not found"):
        load_model(llama_dir)
