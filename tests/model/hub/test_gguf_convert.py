"""GGUF -> Hugging Face folder: round trip of small GGUF files written here with `gguf`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors import safe_open
from tokenizers.pre_tokenizers import ByteLevel

from model.errors import ConversionError
from model.hub.default_model import convert_gguf
from model.hub.gguf.convert import quantization_for, unpermute_rope_rows
from model.text.tokenizer import Tokenizer

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT = 64, 4, 2, 96, 2, 512
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALPHABET = sorted(ByteLevel.alphabet())
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġt h", "Ġth in"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocab() -> tuple[list[str], list[int]]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + ALPHABET + merged
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "▁h", "ll", "he", "llo", "hello"]
SPM_PIECES += ["▁hello", "▁w", "or", "▁wor", "ld", "▁world", "▁t", "▁the", "th", "the"]


def tiny_spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece-style vocabulary: no merges, scores rank pieces, byte-fallback tokens."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, types, scores


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (HF rotate-half -> interleaved pairs)."""
    rows = weight.shape[0]
    # (n_head, 2, head_dim/2, in) -> (n_head, head_dim/2, 2, in)
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
    tied: bool = True,
    arch: str = "llama",
    seed: int = 0,
    spm: bool = False,
) -> dict[str, np.ndarray]:
    """Write a 2-layer Llama GGUF; returns the HF-order float32 weights it stores (after quantizing)."""
    rng = np.random.default_rng(seed)
    tokens, types = tiny_vocab()
    if spm:
        tokens, types, scores = tiny_spm_vocab()
    vocab = len(tokens)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(0)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(TEMPLATE)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, value: np.ndarray, permute_heads: int = 0) -> None:
        value = value.astype(np.float32)
        stored = llama_cpp_permute(value, permute_heads) if permute_heads else value
        if value.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, stored)  # norms stay F32, as llama.cpp writes them
            roundtrip = stored
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            roundtrip = stored.astype(np.float16).astype(np.float32)
        else:
            packed = quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name, packed, raw_dtype=qtype)
            roundtrip = quants.dequantize(packed, qtype)
        expected[hf_name] = (
            unpermute_rope_rows(roundtrip, permute_heads) if permute_heads else roundtrip
        )

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, HIDDEN))
    for i in range(LAYERS):
        p, hf = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", hf + "input_layernorm.weight", 1 + rand(HIDDEN))
        add(p + "attn_q.weight", hf + "self_attn.q_proj.weight", rand(HIDDEN, HIDDEN), HEADS)
        add(
            p + "attn_k.weight",
            hf + "self_attn.k_proj.weight",
            rand(KV_HEADS * HEAD_DIM, HIDDEN),
            KV_HEADS,
        )
        add(p + "attn_v.weight", hf + "self_attn.v_proj.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        add(p + "attn_output.weight", hf + "self_attn.o_proj.weight", rand(HIDDEN, HIDDEN))
        add(p + "ffn_norm.weight", hf + "post_attention_layernorm.weight", 1 + rand(HIDDEN))
        add(p + "ffn_gate.weight", hf + "mlp.gate_proj.weight", rand(FFN, HIDDEN))
        add(p + "ffn_up.weight", hf + "mlp.up_proj.weight", rand(FFN, HIDDEN))
        add(p + "ffn_down.weight", hf + "mlp.down_proj.weight", rand(HIDDEN, FFN))
    add("output_norm.weight", "model.norm.weight", 1 + rand(HIDDEN))
    if not tied:
        add("output.weight", "lm_head.weight", rand(vocab, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _bf16(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).float().numpy()


def _load_bf16_as_f32(path: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file as load_torch

    state = load_torch(str(path))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    return {k: v.float().numpy() for k, v in state.items()}


@pytest.mark.parametrize(
    ("qtype", "tied"),
    [
        (GGMLQuantizationType.Q8_0, True),
        (GGMLQuantizationType.Q4_1, False),
        (GGMLQuantizationType.Q4_0, True),
        (GGMLQuantizationType.F16, False),
        (GGMLQuantizationType.F32, True),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_round_trip_weights(tmp_path: Path, qtype: GGMLQuantizationType, tied: bool) -> None:
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", qtype, tied=tied)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    state = _load_bf16_as_f32(out / "model.safetensors")
    assert set(state) == set(expected)
    assert ("lm_head.weight" in state) is not tied
    for name, value in expected.items():
        assert state[name].shape == value.shape, name
        np.testing.assert_array_equal(state[name], _bf16(value), err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["file"] == "tiny.gguf" and set(source["weight_types"]) == {qtype.name}
    expected_quantization = {"Q8_0": "int8", "Q4_1": "int4", "Q4_0": "int4"}
    assert source["quantization"] == expected_quantization.get(qtype.name, "none")


def test_quantization_for_weight_types() -> None:
    assert quantization_for({"Q4_K": 150, "Q6_K": 30}) == "int4"
    assert quantization_for({"Q5_K": 3, "Q8_0": 1}) == "int8"
    assert quantization_for({"Q2_K": 1}) == "int4" and quantization_for({"IQ4_XS": 1}) == "int4"
    assert quantization_for({"BF16": 7}) == "none" and quantization_for({}) == "none"


def test_qk_rows_come_back_in_hf_order(tmp_path: Path) -> None:
    """Rows numbered 0..n-1 in HF order, permuted as llama.cpp stores them, come back in order."""
    hf_q = np.repeat(np.arange(HIDDEN, dtype=np.float32)[:, None], HIDDEN, axis=1)
    stored = llama_cpp_permute(hf_q, HEADS)
    assert not np.array_equal(stored, hf_q)
    # Row order inside one head: pairs (0, 8), (1, 9), ... as interleaved RoPE wants them.
    assert stored[:4, 0].tolist() == [0, 8, 1, 9]
    np.testing.assert_array_equal(unpermute_rope_rows(stored, HEADS), hf_q)
    kv = np.arange(KV_HEADS * HEAD_DIM, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(
        unpermute_rope_rows(llama_cpp_permute(kv, KV_HEADS), KV_HEADS), kv
    )


def test_config_tokenizer_and_generation_config(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    tokens, _ = tiny_vocab()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert {
        k: config[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rope_theta",
            "bos_token_id",
            "eos_token_id",
            "torch_dtype",
        )
    } == {
        "vocab_size": len(tokens),
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": CONTEXT,
        "rope_theta": 50000.0,
        "bos_token_id": 1,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    }
    assert config["rms_norm_eps"] == pytest.approx(1e-6)
    assert config["rope_scaling"] is None
    # <|im_end|> ends a turn in the template, so it stops generation besides the file's EOS.
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TEMPLATE
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == (
        "<|im_start|>",
        "<|endoftext|>",
        "<|im_end|>",
    )
    assert {v["content"] for v in tok_config["added_tokens_decoder"].values()} == set(SPECIALS)

    tok = Tokenizer.from_dir(out)
    ids = tok.encode("the thin 12<|im_end|>")
    pieces = [tokens[i] for i in ids]
    # Digits split one by one, then byte-level BPE with the file's merge ranks.
    assert pieces == ["t", "he", "Ġthin", "Ġ", "1", "2", "<|im_end|>"]
    assert tok.decode(ids) == "the thin 12"
    assert tok.decode(ids, skip_special_tokens=False) == "the thin 12<|im_end|>"
    assert tok.eos_token_ids == {0, 2}
    text = "héllo wörld ✓ 日本"
    assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hf_transformers_loads_the_folder(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = write_tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q4_1, tied=True)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_array_equal(
        model.model.layers[1].self_attn.k_proj.weight.detach().numpy(),
        _bf16(expected["model.layers.1.self_attn.k_proj.weight"]),
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_dir(out)
    for text in ["the thin 1234", "  in the\nthe", "é🙂x"]:
        assert ours.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_sentencepiece_tokenizer_matches_hf(tmp_path: Path) -> None:
    """SentencePiece GGUFs (Llama 2, Mistral) carry scores, no merges; HF's LlamaTokenizer is the oracle."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("LlamaTokenizer(vocab=..., merges=...) needs transformers 5")
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    write_tiny_gguf(tmp_path / "spm.gguf", GGMLQuantizationType.Q8_0, spm=True)
    out = convert_gguf(tmp_path / "spm.gguf", tmp_path / "hf")
    tokens, _, scores = tiny_spm_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    hf_tok = LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab, dict(zip(tokens, scores, strict=True)))
    )
    ours = Tokenizer.from_dir(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    for text in ["hello world", "the world hello", " hello  w", "héllo\nworld ✓", "dd"]:
        ids = ours.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf_tok.decode(ids) == (text[1:] if text[0] == " " else text)
        # Metaspace adds one "▁" in front unless the text starts with a space already.
        spm_text = text if text[0] == " " else " " + text
        assert b"".join(ours.token_bytes(i) for i in ids) == spm_text.encode()
    assert ours.encode("hello", add_special_tokens=True)[0] == 1  # <s> added like llama.cpp
    assert ours.eos_token_ids == {2}


def test_refuses_other_architectures(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(ConversionError, match="architecture 'gpt2'"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refuses_garbage_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "hf")
    with pytest.raises(ConversionError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no leftovers


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert_gguf(tmp_path / "tiny.gguf", out)
    assert (out / "keep.txt").exists()
    convert_gguf(tmp_path / "tiny.gguf", out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_conversion_leaves_no_half_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.hub.gguf.convert as gguf_convert

    write_tiny_gguf(tmp_path / "tiny.gguf")

    def interrupted(gguf_path: Path, out_dir: Path, say: object) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "write_hf_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_safetensors_has_hf_names_only(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.F32)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert all(n.startswith("model.") for n in names)
    assert len(names) == 2 + 9 * LAYERS
