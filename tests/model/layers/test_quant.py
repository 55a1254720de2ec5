"""Weight-only int8/int4 linear layers (model/layers/quant.py) against F.linear on their dequantized
weights, quantize_for_cpu() on the default model, and the int4 model's fidelity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model.layers.attention.metadata import build_attention_metadata
from model.layers.linear import Linear, faster_batch_dtype, linear, pack_weight, packed_linear
from model.layers.quant import (
    INT4_GROUP_SIZE,
    Int4Weight,
    Int8Weight,
    dequantize_int4,
    dequantize_int8,
    dequantized,
    quantization_supported,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    rescore_top_logits,
    top_indices,
)
from model.models.llama import LlamaForCausalLM
from model.models.loader import load_model
from model.text.tokenizer import Tokenizer
from tests.conftest import has_cxx_compiler

MODES = ["int8", "int4"]
# (out, in): the default model's projections in miniature, a bias-free LM-head-like tall one.
SHAPES = [(96, 64), (48, 160), (256, 96), (1536, 576)]
# The int4 model (bf16 activations, each row's top 16 logits rescored in fp32 from the tied
# head's embedding rows) against its layers' int4 weights dequantized to fp32 and the embedding
# as loaded for the head, measured on a 2-core Xeon with torch 2.13: 99.30% top-1 over 6,256
# positions (max |dlogit| of the reference's top-1 0.40, every flip at a reference margin under
# 0.08); batches from bf16 copies 99.09%. Over 2,208 positions the rate moved between 98.78% and
# 99.09% with the attention kernel's rounding alone (3-D or 4-D SDPA inputs), so the issue's 99%
# is checked over ISSUE_POSITIONS. The 4-bit head alone agrees with its embedding's choice at
# 86.7%; rescoring 8 candidates instead of 16 left a flip at a margin of 0.31.
TIE_MARGIN = 0.25
MIN_TOP1_AGREEMENT = 0.97
MAX_LOGIT_DIFF = 1.5
ISSUE_TOP1_AGREEMENT = 0.99  # issue 14's bar, over at least 2,000 positions
ISSUE_POSITIONS = 6000


def random_weight(num_out: int, num_in: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_out, num_in, generator=gen) * 0.05).to(dtype)


def assert_matches_reference(out, x, weight, mode, bias=None) -> None:
    """out against fp32 math on the dequantized weight and x rounded to bf16 (what the kernels
    read): only the product's rounding to bf16 (2^-9 relative, before the bias is added) and
    summation order are left."""
    product = F.linear(x.bfloat16().float(), dequantized(weight, mode))
    want = product if bias is None else product + bias
    bound = product.abs() * 2**-8 + 1e-5 * product.abs().max()
    error = (out.float() - want).abs()
    assert out.shape == want.shape and (error <= bound).all(), (error / bound).max().item()


def supported_or_skip(mode: str) -> None:
    if quantize_weight(random_weight(32, 64), mode) is None:
        pytest.skip(f"this torch build has no working {mode} CPU kernel")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_rows", [1, 3, 17, 64])
def test_kernel_matches_f_linear_on_the_dequantized_weight(mode, shape, num_rows):
    supported_or_skip(mode)
    weight = random_weight(*shape, seed=num_rows)
    qw = quantize_weight(weight, mode)
    assert isinstance(qw, Int4Weight if mode == "int4" else Int8Weight)
    x = torch.randn(num_rows, shape[1], generator=torch.Generator().manual_seed(1))
    out = qw(x)
    assert out.shape == (num_rows, shape[0]) and out.dtype == torch.float32
    assert_matches_reference(out, x, weight, mode)


@pytest.mark.parametrize("mode", MODES)
def test_bias_and_strided_input(mode):
    supported_or_skip(mode)
    weight, bias = random_weight(64, 96), torch.randn(64)
    qw = quantize_weight(weight, mode, bias)
    wide = torch.randn(5, 3 * 96)
    x = wide[:, 96:192]  # rows not contiguous
    assert_matches_reference(qw(x, bias), x, weight, mode, bias)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_activations(mode):
    supported_or_skip(mode)
    weight = random_weight(96, 128, dtype=torch.bfloat16)
    qw = quantize_weight(weight, mode)
    if qw is None:
        pytest.skip(f"no bf16 {mode} CPU kernel in this torch build")
    x = torch.randn(4, 128).bfloat16()
    out = qw(x)
    assert out.dtype == torch.bfloat16
    assert_matches_reference(out, x, weight, mode)


@pytest.mark.parametrize("mode", MODES)
def test_exact_rows_are_the_dequantized_rows(mode):
    supported_or_skip(mode)
    weight = random_weight(96, 160)
    qw = quantize_weight(weight, mode, keep_codes=True)
    ids = torch.tensor([95, 0, 17, 17, 64])
    assert torch.equal(qw.exact_rows(ids), dequantized(weight, mode)[ids])
    if mode == "int4":
        assert quantize_weight(weight, mode).exact_rows(ids) is None  # codes not kept
        assert qw.nbytes == quantize_weight(weight, mode).nbytes  # matmul does not read them


@pytest.mark.parametrize("mode", MODES)
def test_rescored_top_logits_are_fp32_math_on_the_dequantized_rows(mode):
    supported_or_skip(mode)
    weight = random_weight(1536, 576)
    qw = quantize_weight(weight, mode, keep_codes=True)
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(3))
    approx = qw(x).float()
    logits = rescore_top_logits(approx.clone(), x, qw.exact_rows, k=4)
    want = F.linear(x, dequantized(weight, mode))
    top = approx.topk(4, dim=-1).indices
    rescored = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    assert torch.allclose(logits[rescored], want[rescored], rtol=0, atol=1e-5)
    assert torch.equal(logits[~rescored], approx[~rescored])  # the rest stay as the kernel's
    assert (approx[rescored] != want[rescored]).any()  # bf16 rounding was there to remove
    if mode == "int4":  # without its codes the kernel's logits stay
        no_codes = quantize_weight(weight, mode)
        assert torch.equal(rescore_top_logits(approx.clone(), x, no_codes.exact_rows), approx)


@pytest.mark.parametrize("num_cols", [49152, 4096, 1000, 64 * 4 * 16])
def test_top_indices_are_topk_s(num_cols):
    gen = torch.Generator().manual_seed(num_cols)
    logits = torch.randn(5, num_cols, generator=gen)
    logits[1, 128:160] += 10  # the whole top 16 of a row in two chunks
    logits[2, ::97] += 5  # ... or spread one a chunk
    got = top_indices(logits, 16).sort(dim=-1).values
    assert torch.equal(got, logits.topk(16, dim=-1).indices.sort(dim=-1).values)


def test_int4_round_trip_error_is_at_most_half_a_step():
    weight = random_weight(64, 4 * INT4_GROUP_SIZE)
    q, scales_and_zeros = quantize_int4(weight)
    assert q.dtype == torch.int32 and int(q.min()) == 0 and int(q.max()) == 15
    assert scales_and_zeros.shape == (4, 64, 2) and scales_and_zeros.dtype == torch.bfloat16
    error = (dequantize_int4(q, scales_and_zeros) - weight).abs()
    per_group = scales_and_zeros.float().transpose(0, 1).repeat_interleave(INT4_GROUP_SIZE, dim=1)
    step, zero = per_group[..., 0], per_group[..., 1]
    # Half a step, plus where the zero point's rounding to bf16 pushes a group's end off the grid.
    bound = step / 2 + zero.abs() * 2**-8 + 1e-7
    assert (error <= bound).all(), (error / step).max().item()
    assert error.mean() < step.mean() / 3


def test_int8_round_trip_error_is_at_most_half_a_step():
    weight = random_weight(80, 48)
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scales.dtype == torch.bfloat16
    error = (dequantize_int8(q, scales) - weight).abs()
    assert (error <= scales.float()[:, None] / 2 + 1e-7).all()


def test_zero_rows_and_groups_quantize_to_zero():
    weight = random_weight(32, 64)
    weight[3] = 0.0
    for mode in MODES:
        assert torch.equal(dequantized(weight, mode)[3], torch.zeros(64))


@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        ("int4", (64, 48)),  # in_features not a multiple of the group: falls back, no padding
        ("int4", (40, 64)),  # out_features not a multiple of the packing's 16 rows
        ("int8", (64, 50)),  # in_features not a multiple of 8
    ],
)
def test_shapes_the_kernels_cannot_take_fall_back(mode, shape):
    weight = random_weight(*shape)
    assert not quantization_supported(weight, mode)
    assert quantize_weight(weight, mode) is None


def test_unsupported_weights_and_modes():
    assert quantize_weight(random_weight(32, 64).double(), "int4") is None
    assert quantize_weight(torch.randn(64), "int8") is None
    with pytest.raises(ValueError, match="quantization"):
        quantize_weight(random_weight(32, 64), "int3")


def test_a_disagreeing_kernel_falls_back(monkeypatch):
    """A kernel whose result disagrees with the reference (a broken build) is not used."""
    supported_or_skip("int8")
    real = Int8Weight.matmul
    monkeypatch.setattr(Int8Weight, "matmul", lambda self, x: real(self, x) * 1.05)
    assert quantize_weight(random_weight(32, 64), "int8") is None


def test_a_failing_kernel_falls_back(monkeypatch):
    def fail(self, x):
        raise RuntimeError("no kernel for this CPU")

    monkeypatch.setattr(Int4Weight, "matmul", fail)
    assert quantize_weight(random_weight(32, 64), "int4") is None


def test_a_missing_kernel_falls_back(monkeypatch):
    monkeypatch.setattr(torch.ops, "aten", object())  # a torch build without these ops
    for mode in MODES:
        assert not quantization_supported(random_weight(32, 64), mode)
        assert quantize_weight(random_weight(32, 64), mode) is None


def test_linear_layer_runs_from_its_quantized_weight():
    supported_or_skip("int4")
    layer = Linear(64, 32, bias=True)
    x = torch.randn(4, 64)
    with torch.no_grad():
        weight, bias = layer.weight.clone(), layer.bias.clone()
        layer.quantized = quantize_weight(layer.weight, "int4", layer.bias)
        layer.weight = None  # what quantize_for_cpu does: the plain weight is not read again
        assert_matches_reference(linear(x, layer), x, weight, "int4", bias)
        assert_matches_reference(layer(x), x, weight, "int4", bias)
        assert linear(x, layer, any_dtype=True).dtype == torch.float32  # a bias: added in fp32
        plain = Linear(64, 32, bias=False)
        plain_weight = plain.weight.clone()
        plain.quantized, plain.weight = quantize_weight(plain.weight, "int4"), None
        out = linear(x, plain, any_dtype=True)  # the kernel's bf16 result, not cast back
        assert out.dtype == torch.bfloat16
        assert_matches_reference(out, x, plain_weight, "int4")


def test_a_layer_with_batch_weights_runs_batches_from_its_fp32_copy():
    supported_or_skip("int4")
    layer = Linear(64, 32, bias=False)
    with torch.no_grad():
        weight = layer.weight.clone()
        layer.quantized = quantize_weight(weight, "int4")
        layer.packed_weight = pack_weight(dequantized(weight, "int4"))
        if layer.packed_weight is None:
            pytest.skip("oneDNN-packed linear layers unavailable in this torch build")
        layer.weight, layer.batch_rows = None, 4
        few, many = torch.randn(3, 64), torch.randn(4, 64)
        assert torch.equal(linear(few, layer), layer.quantized(few))
        assert torch.equal(linear(many, layer), packed_linear(many, layer.packed_weight))
        assert_matches_reference(linear(few, layer), few, weight, "int4")
        exact = F.linear(many, dequantized(weight, "int4"))
        assert torch.allclose(linear(many, layer), exact, rtol=0, atol=1e-5)


def test_a_layer_with_a_bf16_batch_copy_computes_batches_in_bf16_and_adds_its_bias_in_fp32():
    supported_or_skip("int4")
    layer = Linear(64, 32, bias=True)
    with torch.no_grad():
        weight, bias = layer.weight.clone(), layer.bias.clone()
        reference = dequantized(weight, "int4")
        layer.quantized = quantize_weight(weight, "int4", bias)
        layer.packed_weight = pack_weight(reference.bfloat16())
        if layer.packed_weight is None:
            pytest.skip("oneDNN bf16 linear layers unavailable on this machine")
        layer.weight, layer.batch_rows = None, 4
        many = torch.randn(6, 64)
        out = linear(many, layer)
        assert out.dtype == torch.float32
        assert linear(many, layer, any_dtype=True).dtype == torch.float32  # the bias, in fp32
        # bf16 math: both operands rounded, the product rounded to bf16, then the fp32 bias.
        product = F.linear(many.bfloat16().float(), reference.bfloat16().float())
        bound = product.abs() * 2**-8 + 1e-5 * product.abs().max()
        assert ((out - bias - product).abs() <= bound).all()
        layer.bias = None
        assert linear(many, layer, any_dtype=True).dtype == torch.bfloat16


def test_faster_batch_dtype_is_fp32_without_onednn_bf16(monkeypatch):
    weight = random_weight(256, 96)
    assert faster_batch_dtype(weight) in (torch.float32, torch.bfloat16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert faster_batch_dtype(weight) == torch.float32


def test_batch_weights_are_calibrated_or_released(default_model_dir):
    supported_or_skip("int4")
    model, _ = load_model(default_model_dir)
    assert model.quantize_for_cpu("int4", batch_weights=True)
    chosen = model.calibrate_batch_rows()
    assert set(chosen) == {(960, 576), (576, 576), (3072, 576), (576, 1536), "lm_head"}
    for layer in model.model.layers.modules():
        if isinstance(layer, Linear):
            rows = chosen[(layer.out_features, layer.in_features)]
            assert layer.quantized is not None and layer.weight is None
            assert (layer.packed_weight is None) == (rows is None)
            assert rows is None or layer.batch_rows == rows
    ids = torch.tensor([5, 900, 4000])
    meta = build_attention_metadata([3], [3], [[0]], 16, "cpu")
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, torch.arange(3), None, meta))
    assert logits.shape == (3, model.config.vocab_size) and torch.isfinite(logits).all()


# ---- the default model ----------------------------------------------------------------------

TEXTS = [
    "The mitochondria is the powerhouse of the cell. It produces most of the chemical energy "
    "needed to power the cell's biochemical reactions, stored in a molecule called ATP.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])\n",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris, which is "
    "also its largest city, on the Seine river in the north of the country.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the "
    "surface while Michael Collins orbited above in the command module Columbia.",
    "Ingredients: 2 cups flour, 1 cup sugar, 3 eggs, 1/2 cup butter. Preheat the oven to 180 C, "
    "mix the dry ingredients, then fold in the eggs and the melted butter.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = "
    "orders.customer_id GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Le renard brun rapide saute par-dessus le chien paresseux. Der schnelle braune Fuchs "
    "springt über den faulen Hund. El rápido zorro marrón salta sobre el perro perezoso.",
    "Q: If a train travels 60 miles in 1.5 hours, what is its average speed?\nA: 60 / 1.5 = 40, "
    "so the train travels at 40 miles per hour on average.",
]


@pytest.fixture(scope="module")
def default_model_pair(
    default_model_dir,
) -> tuple[LlamaForCausalLM, LlamaForCausalLM, torch.Tensor]:
    """(the default model on int4 kernels, the same model on its int4 weights dequantized to fp32
    and run by F.linear, the LM head weights the int4 model's top logits are rescored with: its
    embedding as loaded, as the head is tied)."""
    supported_or_skip("int4")
    quantized, _ = load_model(default_model_dir)
    reference = copy.deepcopy(quantized)
    assert quantized.quantize_for_cpu("int4")
    with torch.no_grad():
        for layer in reference.model.layers.modules():
            if isinstance(layer, Linear):
                layer.weight.copy_(dequantized(layer.weight, "int4"))
    assert reference.lm_head is None  # tied: rescored from the fp32 embedding rows
    return quantized, reference, reference.lm_head_weight.detach().clone()


@pytest.fixture(scope="module")
def default_model_batch_pair(default_model_dir, default_model_pair):
    """default_model_pair with the quantized model's batch copies (fp32 or bf16, whichever
    quantize_for_cpu picked on this machine) running every row count."""
    _, reference, lm_head = default_model_pair
    model, _ = load_model(default_model_dir)
    assert model.quantize_for_cpu("int4", batch_weights=True)
    layers = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
    if model.lm_head_packed is None or not all(m.has_batch_weight for m in layers):
        pytest.skip("the batch copies lost to the int4 kernel at every row count here")
    for layer in layers:
        layer.batch_rows = 1
    model.lm_head_batch_rows = 1
    return model, reference, lm_head


def test_quantized_model_holds_no_plain_projection_weights(default_model_pair):
    quantized, _, _ = default_model_pair
    linears = [m for m in quantized.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m.quantized is not None for m in linears)
    assert quantized.lm_head_quantized is not None
    assert quantized.model.embed_tokens.weight.dtype == torch.float32  # embeddings stay
    assert quantized.pack_for_cpu()  # nothing left to pack; quantized layers stay quantized
    assert quantized.lm_head_packed is None and all(m.packed_weight is None for m in linears)


def whole_prompt_logits(
    model: LlamaForCausalLM, ids: list[int], lm_head: torch.Tensor | None = None
) -> torch.Tensor:
    meta = build_attention_metadata([len(ids)], [len(ids)], [list(range(len(ids)))], 1, "cpu")
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), None, meta)
        return model.compute_logits(hidden) if lm_head is None else F.linear(hidden, lm_head)


def check_top1_agreement(
    default_model_dir, pair, num_positions: int, min_agreement: float = MIN_TOP1_AGREEMENT
) -> None:
    """Texts of several kinds, concatenated in a new order each round until `num_positions`.

    The kernels compute in bf16 (model/layers/quant.py), the reference in fp32: positions whose
    reference top-2 logits are within TIE_MARGIN of each other may flip (bf16 rounding moves
    logits by up to ~1), every other position must agree.
    """
    quantized, reference, lm_head = pair
    tokenizer = Tokenizer.from_dir(default_model_dir)
    texts = [tokenizer.encode(text) for text in TEXTS]
    total, max_diff, flip_margins = 0, 0.0, []
    for round_ in range(len(TEXTS) * 4):
        if total >= num_positions:
            break
        order = texts[round_ % len(texts) :] + texts[: round_ % len(texts)]
        if round_ >= len(texts):
            order = order[::-1]
        ids = [t for text in order for t in text]
        got = whole_prompt_logits(quantized, ids)
        want = whole_prompt_logits(reference, ids, lm_head)
        top2 = want.topk(2, dim=-1)
        flips = got.argmax(-1) != top2.indices[:, 0]
        flip_margins += (top2.values[:, 0] - top2.values[:, 1])[flips].tolist()
        total += len(ids)
        # The logit of the reference's choice (the others far below it are the 4-bit head's).
        best = top2.indices[:, :1]
        max_diff = max(max_diff, (got.gather(1, best) - want.gather(1, best)).abs().max().item())
    assert total >= num_positions, total
    rate = 1 - len(flip_margins) / total
    summary = (
        f"top-1 agreement {rate:.2%} over {total} positions, max |dlogit| of the reference's "
        f"top-1 {max_diff:.4f}, "
        f"reference margins where top-1 differs {[round(m, 4) for m in flip_margins]}"
    )
    print(summary)
    assert all(m < TIE_MARGIN for m in flip_margins), summary
    assert rate >= min_agreement, summary
    assert max_diff < MAX_LOGIT_DIFF, summary


# The int4 kernels (single rows), and the batch copies (bf16 ones: the weights' rounding to bf16
# on top of the activations'; see the top).
PAIRS = ["default_model_pair", "default_model_batch_pair"]


@pytest.mark.parametrize("pair", PAIRS)
def test_int4_model_agrees_with_its_dequantized_weights(default_model_dir, pair, request):
    check_top1_agreement(default_model_dir, request.getfixturevalue(pair), 300)


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS)
def test_int4_model_meets_the_issue_top1_bar(default_model_dir, pair, request):
    pair = request.getfixturevalue(pair)
    check_top1_agreement(default_model_dir, pair, ISSUE_POSITIONS, ISSUE_TOP1_AGREEMENT)


def test_engine_config_validates_quantization():
    from model.engine.config import EngineConfig

    assert EngineConfig(model_dir="m", device="cpu", quantization="int4").quantization == "int4"
    with pytest.raises(ValueError, match="quantization must be one of none, int8, int4"):
        EngineConfig(model_dir="m", device="cpu", quantization="q4_0")
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(model_dir="m", device="cuda", quantization="int8")


GREEDY_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "List three uses of a paperclip.",
]
GREEDY_TOKENS = 32
GREEDY_MARGIN = 0.1  # issue 14: a divergence must sit at a reference margin under this


def test_int4_engine_greedy_text_follows_its_dequantized_weights(
    default_model_dir, default_model_pair
):
    """The int4 engine as served (prefill from the batch copies, decode on the int4 kernels:
    compiled for one sequence, eager for the four together) generates 32 greedy tokens per
    prompt; fp32 math on the dequantized weights then scores that very text: every token must be
    its top-1, or within GREEDY_MARGIN of it."""
    from model.engine.config import EngineConfig
    from model.engine.llm_engine import LLMEngine
    from model.sampling_params import SamplingParams

    _, reference, lm_head = default_model_pair
    engine = LLMEngine(EngineConfig(model_dir=str(default_model_dir), quantization="int4"))
    prompts = [
        engine.tokenizer.encode_chat([{"role": "user", "content": q}]).token_ids
        for q in GREEDY_QUESTIONS
    ]
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    # model/engine/cpu_decode.py compiled (where torch.compile has a C++ compiler)
    assert engine.runner.lone_decode is not None or not has_cxx_compiler()
    alone = [engine.generate([prompt], params)[0] for prompt in prompts]
    together = engine.generate(prompts, params)
    margins = []
    for prompt, (choice,) in zip(prompts + prompts, alone + together, strict=True):
        tokens = choice.token_ids
        assert len(tokens) == GREEDY_TOKENS
        logits = whole_prompt_logits(reference, prompt + tokens, lm_head)[len(prompt) - 1 : -1]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        margins += (logits.max(-1).values - chosen).tolist()
    divergences = [round(m, 4) for m in margins if m > 0]
    print(
        f"{len(divergences)} of {len(margins)} greedy tokens not the reference's top-1:",
        divergences,
    )
    assert all(m < GREEDY_MARGIN for m in margins), divergences
