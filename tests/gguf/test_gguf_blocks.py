"""A GGUF's linears and token table run in the file's own blocks (the default on the CPU):
the weights are the file's bytes, mapped; the kernels' products equal float64 ones on ggml's
dequantized weights and activations; the model's logits stay within the activation rounding of
the dequantized model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gguf.gguf_files import QUANTS
from torchchat import kernels
from torchchat.builder import build_model, model_from_checkpoint
from torchchat.kernels import ggml
from torchchat.options import ModelOptions, QuantizeOptions, SourceOptions
from torchchat.quant.gguf_blocks import GGUFEmbedding, GGUFLinear, dequantize_rows

QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
ACT = {2: 8, 6: 8, 8: 8, 3: 9, 7: 9}  # weight type -> activation type; K-quants: Q8_K (15)


def _opts(name: str, **quant) -> ModelOptions:
    return ModelOptions(
        source=SourceOptions(gguf_path=QUANTS / f"tiny-random-{name}.gguf"),
        quantization=QuantizeOptions(**quant),
    )


@pytest.fixture(scope="module")
def blocks_models():
    return {name: model_from_checkpoint(_opts(name))[0] for name in QUANTIZED}


@pytest.mark.parametrize("name", QUANTIZED)
def test_blocks_are_the_files_bytes_and_dequantize_as_ggml(name, blocks_models):
    model = blocks_models[name]
    ref, _, _ = model_from_checkpoint(_opts(f"{name}-F32"))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, GGUFLinear)]
    assert len(linears) == 8  # 7 a layer, 1 layer, and the output
    assert isinstance(model.tok_embeddings, GGUFEmbedding)
    for n, m in linears:
        # llama-quantize's F32 sibling: ggml's own dequantization of the same blocks
        assert torch.equal(m.dequantize(), ref.get_submodule(n).weight), n
    table = model.tok_embeddings
    assert torch.equal(dequantize_rows(table.weight, table.ggml_type, table.dim),
                       ref.tok_embeddings.weight)  # fmt: skip


def test_blocks_are_views_of_the_mapped_file(blocks_models):
    model = blocks_models["Q4_K_M"]
    base = model.layers[0].attention.wq.weight.untyped_storage().data_ptr()
    for m in model.modules():
        if isinstance(m, GGUFLinear | GGUFEmbedding):
            assert m.weight.untyped_storage().data_ptr() == base  # one mapping, no copies


def _q8_activations(x: np.ndarray, act: int) -> tuple[np.ndarray, np.ndarray | None]:
    """x (M, K) fp32 quantized per block as ggml's reference does, back to float64; for Q8_1
    also how far each block's stored sum s = fp16(d * sum(q)) is from the sum of its values
    (ggml scales the weights' block minimums by s)."""
    if act in (8, 9):  # Q8_0, Q8_1 as ggml's x86 code: d = amax / 127 in fp16, codes
        b = x.reshape(x.shape[0], -1, 32)  # round(x * (127 / amax)) half to even
        amax = np.abs(b).max(-1, keepdims=True)
        d = amax / np.float32(127)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0)
        q = np.rint(b * inv.astype(np.float32))
        dx = d.astype(np.float16).astype(np.float64)
        sums = q.sum(-1, keepdims=True)
        s = (d * sums.astype(np.float32)).astype(np.float16).astype(np.float64)
        return (q * dx).reshape(x.shape), (s - dx * sums)[..., 0] if act == 9 else None
    b = x.reshape(x.shape[0], -1, 256)  # Q8_K: the signed value of largest magnitude -> -127
    top = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    iscale = np.where(top != 0, np.float32(-127) / np.where(top != 0, top, 1), 0)
    iscale = iscale.astype(np.float32)
    q = np.minimum(127, np.rint(b * iscale))
    d = np.where(iscale != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0)
    return (q * d.astype(np.float32).astype(np.float64)).reshape(x.shape), None


def _kernel_levels():
    return [lv for lv in kernels.available_isas() if lv != "off"]


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_decode_products_equal_float64_on_ggmls_values(name, rows, blocks_models):
    """linear_ggml on every level: sums of exact integer products scaled in fp32 -- within
    2e-6 of sum |w x| of the float64 product of the dequantized weights and activations."""
    model = blocks_models[name]
    g = torch.Generator().manual_seed(rows)
    for level in _kernel_levels():
        kernels.select_isa(level)
        try:
            for n, m in model.named_modules():
                if not isinstance(m, GGUFLinear):
                    continue
                x = torch.randn(rows, m.in_features, generator=g)
                x[0, :7] = 0.0  # a block with zeros in it
                y = ggml.linears(x, [m.weight], [m.ggml_type])[0].double()
                w = m.dequantize().double().numpy()
                xq, s_err = _q8_activations(x.numpy(), ACT.get(m.ggml_type, 15))
                ref = xq @ w.T
                if s_err is not None:  # Q4_1, Q5_1: each block's minimum m times s
                    blocks = m.weight.numpy().reshape(m.out_features, s_err.shape[1], -1)
                    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0]
                    ref = ref + s_err @ mins.astype(np.float64).T
                ref = torch.from_numpy(ref)
                bound = 2e-6 * torch.from_numpy(np.abs(xq) @ np.abs(w).T) + 1e-30
                assert ((y - ref).abs() <= bound).all(), (level, n)
        finally:
            kernels.select_isa(kernels.available_isas()[0])


@pytest.mark.parametrize("name", ["Q4_K_M", "Q8_0", "Q5_1"])
def test_prefill_and_table_rows_use_the_exact_weights(name, blocks_models):
    model = blocks_models[name]
    m = model.layers[0].feed_forward.w2
    x = torch.randn(2, 40, m.in_features)
    y = ggml.gemm(x, m.weight, m.ggml_type)
    w = m.dequantize().double()
    ref, scale = x.double() @ w.T, x.double().abs() @ w.abs().T
    # bf16 tiles and x where the CPU has bf16 dot products: 2^-9 each, and the sums' rounding;
    # a type the level prefills in integers rounds x to 8 bits per block (its exact sums:
    # test_integer_prefill_sums_as_decode); a wrong weight would be off by ~100%
    integer = torch.ops.torchchat.ggml_gemm_types() >> m.ggml_type & 1
    rel = 2**-7 if kernels.simd_level() & kernels.BF16_GEMM or integer else 1e-5
    assert ((y.double() - ref).abs() <= rel * scale).all()
    table = model.tok_embeddings
    ids = torch.tensor([[5, 0, 511], [5, 7, 100]])
    full = dequantize_rows(table.weight, table.ggml_type, table.dim)
    assert torch.equal(ggml.rows(table.weight, table.ggml_type, table.dim, ids), full[ids])


# The types a level prefills in integers, by its feature bits: with VNNI (GGML_GEMM) the
# K-quants and Q8_0 (vpdpbusd on codes + 128), on AVX2 (GGML_GEMM) Q5_K and Q6_K (int16 pair sums
# added a few steps at a time), with the int4 GEMM on 8-bit activations (AVX2, AVX-512) Q4_0.
@pytest.mark.parametrize("path", ["integer GEMM", "decode's kernel"])
@pytest.mark.parametrize("name", QUANTIZED)
def test_prefill_sums_as_decode(name, path, blocks_models):
    """Where a level prefills a type in integers (torchchat::ggml_gemm_types: AVX512-VNNI Q4_0,
    Q8_0 and the K-quants; AVX2 Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants but Q2_K, Q3_K), it sums
    what decode sums -- x quantized to Q8_0, Q8_1 or Q8_K as ggml does, exact integer sums scaled
    in fp32 -- so prefill's rows equal decode's to fp32 rounding (2e-6 of sum |w x|), on 40
    tokens (a partial 16, and 64-row blocks). Up to torchchat::ggml_rows_prefill(type) tokens (AVX2: a few dozen,
    any type) prefill runs decode's kernel itself, 8 tokens at a time: decode's very sums."""
    model = blocks_models[name]
    g = torch.Generator().manual_seed(3)
    tested = set()
    for level in _kernel_levels():
        kernels.select_isa(level)
        try:
            types = torch.ops.torchchat.ggml_gemm_types()
            for n, m in model.named_modules():
                if not isinstance(m, GGUFLinear):
                    continue
                rows = torch.ops.torchchat.ggml_rows_prefill(m.ggml_type)
                tokens = 40 if path == "integer GEMM" else min(21, rows)
                if (path == "integer GEMM") != (types >> m.ggml_type & 1 and rows < tokens):
                    continue
                if tokens <= kernels.MAX_ROWS:
                    continue
                x = torch.randn(tokens, m.in_features, generator=g)
                x[1, :32] = 0.0  # a block of zeros: scale 0
                y = ggml.gemm(x, m.weight, m.ggml_type)
                ref = torch.cat([ggml.linears(x[i : i + 8], [m.weight], [m.ggml_type])[0]
                                 for i in range(0, tokens, 8)])  # fmt: skip
                if path == "integer GEMM":
                    bound = 2e-6 * (x.abs() @ m.dequantize().abs().T) + 1e-30
                    assert ((y - ref).abs() <= bound).all(), (level, n)
                else:
                    assert torch.equal(y, ref), (level, n)
                tested.add(m.ggml_type)
        finally:
            kernels.select_isa(kernels.available_isas()[0])
    if not tested:
        pytest.skip(f"no level of this CPU prefills {name}'s types on its {path}")


def test_rows_prefill_names_an_unknown_type():
    for bad in (1, 15, -1, 1 << 40):  # F16, Q8_K (an activation type), nonsense
        with pytest.raises(RuntimeError, match=f"ggml type {bad} is not one the kernels run"):
            torch.ops.torchchat.ggml_rows_prefill(bad)
    assert torch.ops.torchchat.ggml_rows_prefill(14) >= 0  # Q6_K


@pytest.mark.parametrize("name", QUANTIZED)
def test_logits_within_activation_rounding_of_the_dequantized_model(name):
    blocks = build_model(_opts(name))
    floats = build_model(_opts(f"{name}-F32"))
    tokens = torch.tensor([[1, 400, 57, 312, 99, 7, 250, 3]])
    a, b = blocks.runtime.forward(tokens, 0), floats.runtime.forward(tokens, 0)
    # 8-bit activations per block (ggml's): logits agree to ~1% of their spread.
    assert (a - b).abs().max() < 0.02 * (b.max() - b.min())


def test_fused_decode_step_gives_the_modules_tokens():
    """Q4_K and Q6_K linears in one model: one fused step, the modules' greedy tokens."""
    from tests.kernels.test_fused_decode import runtime_prefill_then_decode

    built = build_model(_opts("Q4_K_M"))
    assert built.runtime.fused_decode
    tokens = torch.tensor([[1, 400, 57, 312, 99, 7, 250, 3, 17, 42]])
    logits = []
    for fused in (True, False):
        built.runtime.fuse_decode(fused)
        logits.append(runtime_prefill_then_decode(built.runtime, tokens, 4))
    assert torch.allclose(logits[0], logits[1], rtol=0, atol=1e-5 * logits[1].abs().max())


def test_dequantize_flag_and_what_needs_floats(tmp_path):
    """--gguf-dequantize, and convert (model.pth holds floats), load ggml's float weights."""
    model, _, _ = model_from_checkpoint(_opts("Q4_K_M", gguf_dequantize=True))
    assert not any(isinstance(m, GGUFLinear | GGUFEmbedding) for m in model.modules())
    ref, _, _ = model_from_checkpoint(_opts("Q4_K_M-F32"))
    from torchchat.checkpoint import load_checkpoint
    from torchchat.convert import convert

    convert(_opts("Q4_K_M"), tmp_path / "out")
    saved = load_checkpoint(tmp_path / "out" / "model.pth").state_dict
    assert all(torch.equal(saved[k], v) for k, v in ref.state_dict().items())
