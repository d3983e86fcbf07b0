"""torchchat's own CPU kernels (torchchat/kernels): each op against a float reference, the models
that use them against the same models on torch's ops, torch.compile and export around them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.support import STORIES_BIN, random_args, random_state_dict, run_torchchat
from torchchat import kernels
from torchchat.errors import TorchchatError
from torchchat.export.program import export_program
from torchchat.model.transformer import Transformer, attend_rows
from torchchat.quant.apply import quantize
from torchchat.quant.config import load_quantize_spec
from torchchat.quant.linear import Int4Linear, Int8Linear
from torchchat.quant.primitives import quantize_per_token_int8
from torchchat.runtime import kernel_modules
from torchchat.runtime.kernel_modules import KernelLinear, project, use_kernels

pytestmark = pytest.mark.skipif(
    kernels.simd_level() == 0, reason="torchchat's CPU kernels need an x86 CPU with AVX-512"
)
needs_bf16 = pytest.mark.skipif(
    not kernels.simd_level() & kernels.INT4, reason="these kernels have no int4 linear"
)


# (rows, in, out): one token, a few, the most the kernels take; dims off every vector width.
SHAPES = [(1, 768, 768), (3, 100, 37), (8, 288, 1000), (1, 17, 5), (5, 64, 176)]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def on_kernels(module: torch.nn.Module) -> torch.nn.Module:
    """The module with its kernel-backed classes, as a runtime swaps them in."""
    assert use_kernels(module)
    return module


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float32, 2e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)],  # output rounding
)
@pytest.mark.usefixtures("isa")
def test_float_linear_matches_fp32_reference(m, k, n, dtype, tol):
    torch.manual_seed(m * k + n)
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    y = kernels.float_linear(x, w)
    assert y.dtype == dtype and y.shape == (m, n)
    assert max_rel(y, F.linear(x.float(), w.float())) < tol


@pytest.mark.usefixtures("isa")
def test_float_linear_takes_batched_rows_and_strided_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40)
    big = torch.randn(50, 64)
    w = big[:, :40]  # rows 64 apart
    assert max_rel(kernels.float_linear(x, w), F.linear(x, w)) < 2e-6


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("groupsize", [0, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("isa")
def test_int8_linear_matches_dequantized_reference(m, k, n, groupsize, dtype):
    """Scales as saved (bf16) and as an fp32 model holds them after .to(float32). A level that
    decodes int8 in integers (INT8_Q8) first rounds x to 8 bits per 32 values where the width
    and the group are multiples of 32 (768, 288, 64, and 17 padded to 32; not 100, padded to
    112): the reference rounds it so too, the sums then exact per block, fp32 over blocks."""
    torch.manual_seed(n)
    lin = torch.nn.Linear(k, n, bias=False)
    q = Int8Linear.from_float(lin, groupsize)
    x = torch.randn(m, k).to(dtype)
    y = kernels.int8_linear(x, q.weight, q.scales, groupsize)
    assert torch.equal(kernels.int8_linear(x, q.weight, q.scales.float(), groupsize), y)
    assert y.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    xr, kw = x.double(), q.weight.shape[1]  # the width padded to 16
    if kernels.simd_level() & kernels.INT8_Q8 and kw % 32 == 0 and groupsize % 32 == 0:
        xr = q8_activations(x, kw)[:, :k]
        if dtype == torch.float32:  # rounded, not fp32
            assert max_rel(y, F.linear(x.float(), q.dequantize())) > 1e-4
    assert max_rel(y, F.linear(xr, q.dequantize().double())) < tol


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(1, 768, 768), (2, 256, 80), (8, 384, 1000), (4, 128, 176)])
@pytest.mark.parametrize("groupsize", [32, 64, 128])
@pytest.mark.usefixtures("isa")
def test_int4_linear_matches_dequantized_reference(m, k, n, groupsize):
    """Rows in blocks of 64 and a last block of 16 or 48 rows (torch's pack layout differs)."""
    torch.manual_seed(n)
    q = Int4Linear.from_float(torch.nn.Linear(k, n, bias=False), groupsize)
    x = torch.randn(m, k)
    y = kernels.int4_linear(x, q.weight, q.scales_and_zeros, groupsize)[:, :n]
    reference = F.linear(x.bfloat16().float(), q.dequantize().float())  # bf16 activations
    assert max_rel(y, reference) < 1e-5


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int8 g32", "int4"])
@pytest.mark.usefixtures("isa")
def test_a_grouped_call_equals_one_call_per_matrix(m, kind):
    """q, k, v (or w1, w3) in one call: the same numbers, bit for bit, as three calls; widths
    that end in a partial 64-row block and split unevenly over the threads."""
    if kind == "int4" and not kernels.simd_level() & kernels.INT4:
        pytest.skip(f"the {kernels.isa()} kernels have no int4 linear")
    torch.manual_seed(m)
    linears = [torch.nn.Linear(96, n, bias=False) for n in (80, 48, 176)]
    x = torch.randn(m, 96)
    if kind in ("fp32", "bf16"):
        dt = torch.float32 if kind == "fp32" else torch.bfloat16
        x, ws = x.to(dt), [lin.weight.detach().to(dt) for lin in linears]
        together, apart = kernels.float_linears(x, ws), [kernels.float_linear(x, w) for w in ws]
    elif kind.startswith("int8"):
        g = 32 if "g32" in kind else 0
        qs = [Int8Linear.from_float(lin, g) for lin in linears]
        ws, ss = [q.weight for q in qs], [q.scales for q in qs]
        together = kernels.int8_linears(x, ws, ss, g)
        apart = [kernels.int8_linear(x, w, s, g) for w, s in zip(ws, ss, strict=True)]
    else:
        qs = [Int4Linear.from_float(lin, 32) for lin in linears]
        ws, szs = [q.weight for q in qs], [q.scales_and_zeros for q in qs]
        together = kernels.int4_linears(x, ws, szs, 32)
        apart = [kernels.int4_linear(x, w, sz, 32) for w, sz in zip(ws, szs, strict=True)]
    assert [t.shape for t in together] == [(m, n) for n in (80, 48, 176)]
    for t, a in zip(together, apart, strict=True):
        assert torch.equal(t, a)


@pytest.mark.parametrize(
    "make",
    [
        lambda lin: Int4Linear.from_float(lin, 32),
        lambda lin: Int4Linear.from_float_8da4w(lin, 32),
        lambda lin: Int8Linear.from_float(lin, 0),
    ],
    ids=["int4", "8da4w", "int8"],
)
@pytest.mark.usefixtures("isa")
def test_project_applies_each_linear_once_grouped_or_not(make):
    """`project`: one kernel call for modules of one kind (biases, rows padded to 16), one
    call each for a mix; both give what each module gives on its own."""
    if not kernels.simd_level() & kernels.INT4:
        pytest.skip(f"the {kernels.isa()} kernels have no int4 linear")
    torch.manual_seed(2)
    mods = [on_kernels(make(torch.nn.Linear(64, n, bias=True))) for n in (70, 32)]
    x = torch.randn(1, 2, 64)
    alone = [m(x) for m in mods]
    grouped = type(mods[0]).forward_many(x, mods)
    assert grouped is not None
    mixed = [mods[0], KernelLinear(64, 24)]
    with torch.inference_mode():
        for got, want in zip(project(x, mods), alone, strict=True):
            assert got.shape == want.shape and torch.equal(got, want)
        for got, want in zip(grouped, alone, strict=True):
            assert torch.equal(got, want)
        got = project(x, mixed)
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], mixed[1](x))


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(9, 256, 128), (64, 96, 80), (17, 128, 176), (64, 2048, 640)])
@pytest.mark.usefixtures("isa")
def test_int4_gemm_matches_dequantized_reference(m, k, n):
    """Tiles of 256 rows, a last tile of fewer (640), a last block of fewer than 64 rows (80,
    176): each output is the bf16 GEMM's on the dequantized weights, rounded once to bf16."""
    torch.manual_seed(k + n)
    q = Int4Linear.from_float(torch.nn.Linear(k, n, bias=False), 32)
    x = torch.randn(m, k)
    y = kernels.int4_gemm(x, q.weight, q.scales_and_zeros, 32)
    assert y.dtype == torch.bfloat16 and y.shape == (m, q.n)
    reference = F.linear(x.bfloat16().float(), q.dequantize().bfloat16().float())
    assert max_rel(y[:, :n].float(), reference) < 8e-3  # bf16 output: 2^-8 relative


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(9, 4096, 1024), (64, 4000, 1100)])
@pytest.mark.usefixtures("isa")
def test_int8_gemm_matches_scaled_bf16_gemm(m, k, n):
    """Tiles of the codes (1100: a last tile of fewer rows; K = 4000: padded columns) give what a
    bf16 GEMM on all the codes and the row scales give, within bf16 rounding."""
    torch.manual_seed(k + n)
    q = Int8Linear.from_float(torch.nn.Linear(k, n, bias=False), 0)
    x = F.pad(torch.randn(m, k), (0, q.weight.shape[1] - k)).bfloat16()
    y = kernels.int8_gemm(x, q.weight, q.scales)
    small = kernels.int8_gemm(x[:, :256], q.weight[:, :256].contiguous(), q.scales)
    assert (small is None) == bool(kernels.simd_level() & kernels.BF16_GEMM)  # aten's bf16 GEMM
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    reference = F.linear(x.float(), q.weight.float()) * q.scales.bfloat16().float()
    assert max_rel(y, reference) < 8e-3  # bf16 GEMM output, then the scaled product: 2 roundings


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("isa")
def test_wide_gemm_is_the_fp32_product_rounded_once(dtype):
    """Levels without bf16 dot products run bf16/fp16 prefill as fp32 GEMMs on widened tiles
    (600 rows: tiles of 256 and a shorter last one): the exact products summed in fp32, rounded
    once to the dtype, as torch's GEMM defines it; levels with them leave it to torch."""
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 37, 300).to(dtype), torch.randn(600, 300).to(dtype), torch.randn(600)
    y = kernels.wide_gemm(x, w, b.to(dtype))
    if kernels.simd_level() & kernels.BF16_GEMM:
        assert y is None
        return
    reference = (F.linear(x.double(), w.double()).to(dtype) + b.to(dtype)).float()
    assert y.dtype == dtype and y.shape == (2, 37, 600)
    assert max_rel(y.float(), reference) < 1e-2  # one rounding apart where fp32 sums tie
    assert kernels.wide_gemm(x[:1, :8], w, None) is None  # decode rows: the GEMV kernels


@pytest.mark.usefixtures("isa")
def test_fp32_gemm_matches_f_linear():
    """fp32 prefill (oneDNN, or torchchat's own GEMM where the level has one) within fp32
    summation of float64; the own GEMM sums each output as one FMA chain over k, so a token's
    row is the same to the bit whatever the batch it is in (37 tokens: two panels of 16 and a
    part-full one; 500 rows: tiles and a short last one)."""
    torch.manual_seed(2)
    x, w, b = torch.randn(2, 37, 300), torch.randn(500, 300), torch.randn(500)
    y = kernels.fp32_gemm(x, w, b)
    if kernels.isa() == "off":
        assert y is None
        return
    assert max_rel(y, F.linear(x.double(), w.double(), b.double())) < 1e-6
    if kernels.simd_level() & kernels.F32_GEMM:
        for rows in (slice(3, 12), slice(20, 37)):
            assert torch.equal(kernels.fp32_gemm(x[1, rows], w, b), y[1, rows])


def q8_activations(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (M, <= k) as gemm_int4_q8 rounds it, in float64: per 32 values d = max|x| / 127 and
    round-half-even(x / d) * d, zeros past x's columns."""
    xb = F.pad(x.float(), (0, k - x.shape[1])).reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1.0)), 0.0)
    return (q.double() * d.double()).reshape(x.shape[0], k)


@pytest.mark.parametrize(
    "m,k,n,group", [(9, 256, 128, 32), (13, 96, 80, 64), (70, 2048, 640, 128), (33, 512, 200, 256)]
)
@pytest.mark.usefixtures("isa")
def test_int4_q8_gemm_is_the_integer_product(m, k, n, group):
    """Weight-only int4 prefill in integers: x rounded to 8 bits per 32 values (as llama.cpp's Q8_0
    activations), codes times those 8-bit values summed exactly, scaled and offset by each
    group's zero in fp32. Against float64 on the same rounded activations and the dequantized
    weights: within fp32 summation (2^-24 per block of the sum of |terms|; measured ~6e-8),
    where one code off would move a block's term by d |s|. Every level gives the others' result
    to the bit (the scalar reference's too: the harness), and a row holding an inf comes out NaN
    without touching the others. K = 96 of 128: padded columns; 80 and 200 rows: short blocks.
    The scalar level keeps prefill on torch's GEMM (bf16 tiles)."""
    torch.manual_seed(m + k + group)
    w = Int4Linear.from_float(torch.nn.Linear(k, n, bias=False), group)
    x = torch.randn(m, k) * torch.rand(m, 1) * 4
    x[0, :32] = 0.0  # an all-zero block: d = 0
    y = kernels.int4_gemm_q8(x, w.weight, w.scales_and_zeros, group)
    if not kernels.simd_level() & kernels.INT4_Q8_GEMM:
        assert y is None  # this level prefills int4 on bf16 tiles
        return
    assert y.dtype == torch.float32 and y.shape == (m, w.n)
    xh, wd = q8_activations(x, w.k), F.pad(w.dequantize().double(), (0, w.k - k))
    bound = (xh.abs() @ wd.abs().T) * (w.k // 32 + 2) * 2.0**-24
    assert ((y[:, :n].double() - xh @ wd.T).abs() <= bound).all()
    level = kernels.isa()
    for other in [lv for lv in kernels.available_isas() if lv not in (level, "off")]:
        kernels.select_isa(other)
        try:
            if kernels.simd_level() & kernels.INT4_Q8_GEMM:
                assert torch.equal(y, kernels.int4_gemm_q8(x, w.weight, w.scales_and_zeros, group))
        finally:
            kernels.select_isa(level)
    for rows in (1, 3, 8):  # decode: prefill's sums to the bit where the level decodes so
        few = kernels.int4_gemm_q8(x[:rows], w.weight, w.scales_and_zeros, group)
        if kernels.q8_decode(group):
            assert torch.equal(few, y[:rows])
        else:
            assert few is None  # the int4 kernel on bf16 activations takes them
    x[1, 5] = float("inf")
    y = kernels.int4_gemm_q8(x, w.weight, w.scales_and_zeros, group)
    assert y[1].isnan().all() and y[torch.arange(m) != 1].isfinite().all()


@pytest.mark.parametrize(
    "m,k,n,group,sdt",
    [
        (9, 256, 128, 0, torch.float32),
        (13, 96, 80, 32, torch.bfloat16),
        (70, 2048, 640, 0, torch.bfloat16),
        (33, 512, 200, 128, torch.float32),
    ],
)
@pytest.mark.usefixtures("isa")
def test_int8_q8_gemm_is_the_integer_product(m, k, n, group, sdt):
    """int8 prefill in integers on a level that has it (else None: the bf16/fp32 GEMMs): x
    rounded to 8 bits per 32 values as int8 decode rounds it, each block's code products summed
    exactly, scaled in fp32. Against float64 on the same rounded activations and the
    dequantized weights: within fp32 summation (2^-24 per block of the sum of |terms|, the
    +128 code offset's terms included), where one code off would move a block's term by d |s|.
    K = 96 of x's 80 columns: zeros past them; 80 and 200 rows: short blocks. A row holding an
    inf comes out NaN without touching the others."""
    torch.manual_seed(m + k + group)
    w = Int8Linear.from_float(torch.nn.Linear(k, n, bias=False), group)
    scales = w.scales.to(sdt)
    x = torch.randn(m, k) * torch.rand(m, 1) * 4
    x[0, :32] = 0.0  # an all-zero block: d = 0
    xs = x[:, :80] if k == 96 else x
    y = kernels.int8_gemm_q8(xs, w.weight, scales, group)
    if not kernels.simd_level() & kernels.INT8_Q8_GEMM:
        assert y is None
        return
    assert y.dtype == torch.float32 and y.shape == (m, n)
    wd = w.weight.double().reshape(n, -1, group or k) * scales.double().reshape(n, -1, 1)
    wd = wd.reshape(n, k)
    xh = q8_activations(xs, k)
    offset = (
        128 * xh.abs() @ scales.double().abs().repeat_interleave(group or k, -1).reshape(n, k).T
    )
    bound = (xh.abs() @ wd.abs().T + offset) * (k // 32 + 2) * 2.0**-24
    assert ((y.double() - xh @ wd.T).abs() <= bound).all()
    moved = w.weight.clone()  # one code a row one step toward 0: y moves by -+ x_0 s_0
    step = torch.where(moved[:, 0] > 0, -1, 1).to(torch.int8)
    moved[:, 0] += step
    y1 = kernels.int8_gemm_q8(xs, moved, scales, group)
    change = xh[:, :1] * (step.double() * scales.double().reshape(n, -1)[:, 0])
    assert ((y1.double() - y.double() - change).abs() <= 2 * bound).all()
    assert (change.abs() > 2 * bound).any()
    x[1, 5] = float("inf")
    y = kernels.int8_gemm_q8(x, w.weight, scales, group)
    assert y[1].isnan().all() and y[torch.arange(m) != 1].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("isa")
def test_prefill_norm_and_rope_ops_compute_as_the_modules(dtype):
    """RMSNorm and RoPE of eager prefill in one op each, the modules' arithmetic: RoPE to the
    bit (the same fp32 products, rounded once to the dtype), as is RMSNorm's normalizing but for
    its sum of squares, added in another order (fp32: within 2e-6; bf16 / fp16: where the
    normalized value lands near a rounding boundary, one ulp, times the weight and rounded
    again: two ulps of the dtype at most). Per-row freqs (a paged step's) too;
    off when the kernels are (the modules' own math then)."""
    from torchchat.model.transformer import RMSNorm, apply_rope

    torch.manual_seed(5)
    norm = RMSNorm(200, 1e-5).to(dtype)
    norm.weight.data = torch.randn(200).to(dtype)
    x = (torch.randn(2, 37, 200) * 3).to(dtype)
    q = torch.randn(2, 37, 6, 16).to(dtype)
    freqs, per_row = torch.randn(37, 8, 2), torch.randn(2, 37, 8, 2)
    y = kernels.rms_norm(x, norm.weight, 1e-5)
    if kernels.isa() == "off":
        assert y is None and kernels.rope(q, freqs) is None
        return
    assert y.dtype == dtype and y.shape == x.shape
    bound = {torch.float32: 2e-6, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}[dtype]
    with torch.no_grad():
        ref = norm(x).float()
    assert ((y.float() - ref).abs() <= bound * ref.abs() + 1e-30).all()
    assert torch.equal(kernels.rope(q, freqs), apply_rope(q, freqs))
    assert torch.equal(kernels.rope(q, per_row), apply_rope(q, per_row))
    assert not torch.equal(kernels.rope(q, per_row), kernels.rope(q, freqs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("isa")
def test_prefill_gate_op_computes_as_the_module(dtype):
    """silu(h1) * h3 in one op: SiLU in fp32 on the level's exp polynomial (~2e-7 relative),
    rounded to the dtype, times h3, rounded: fp32 within 1e-6 of aten's; bf16 / fp16 within two
    ulps (a value near a rounding boundary lands on the other side, then the product rounds
    again). Large negative inputs give (-)0 as aten's does, to 1e-30."""
    torch.manual_seed(6)
    h1 = (torch.randn(2, 37, 300) * 4).to(dtype)
    h1[0, 0, :3] = torch.tensor([-100.0, 0.0, 90.0]).to(dtype)
    h3 = torch.randn(2, 37, 300).to(dtype)
    y = kernels.silu_mul(h1, h3)
    if kernels.isa() == "off":
        assert y is None
        return
    ref = (F.silu(h1) * h3).float()
    bound = {torch.float32: 1e-6, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}[dtype]
    assert y.dtype == dtype and y.shape == h1.shape
    assert ((y.float() - ref).abs() <= bound * ref.abs() + 1e-30).all()
    assert not torch.equal(y, kernels.silu_mul(h3, h1))  # not symmetric: which one is gated


needs_vnni = pytest.mark.skipif(
    not kernels.simd_level() & kernels.INT8_GEMM, reason="these kernels have no 8da4w integer GEMM"
)


@needs_vnni
@pytest.mark.parametrize("m,k,n,group", [(9, 256, 128, 32), (13, 96, 80, 64), (64, 2048, 640, 64)])
@pytest.mark.usefixtures("isa")
def test_8da4w_gemm_is_the_integer_product(m, k, n, group):
    """x quantized per token as quantize_per_token_int8 does, sum_k (q_x - z_x) w_k in integers,
    scaled once: the fp64 reference on the same codes agrees to fp32 rounding (one code off would
    not). 80 rows: a last block of 16; 640: ten blocks; K = 96 of 128: padded columns."""
    torch.manual_seed(m + k)
    w = Int4Linear.from_float_8da4w(torch.nn.Linear(k, n, bias=False), group)
    x = torch.randn(m, k) * torch.rand(m, 1) * 4 + 0.3  # skewed rows: zero points far from 0
    y = kernels.gemm_8da4w(x, w.weight, w.scales_and_zeros, group)
    assert y.dtype == torch.float32 and y.shape == (m, w.n)
    q, scale, zero = quantize_per_token_int8(x)  # the codes the op must have found
    reference = F.linear(((q - zero) * scale).double(), w.dequantize().double())
    assert max_rel(y[:, :n], reference) < 1e-5
    for rows in (1, 3, 8):  # decode: prefill's sums to the bit where the level decodes so
        few = kernels.gemm_8da4w(x[:rows], w.weight, w.scales_and_zeros, group)
        if kernels.q8_decode(group):
            assert torch.equal(few, y[:rows])
        else:
            assert few is None  # the int4 kernel on fake-quantized activations takes them


@needs_vnni
@pytest.mark.usefixtures("isa")
def test_prefill_ops_reject_mismatched_weights():
    """One check for the int4 layout: a wrong scales tensor or group is a one-line error naming
    the op and what is wrong, not a read past the end."""
    w = Int4Linear.from_float_8da4w(torch.nn.Linear(64, 32, bias=False), 32)
    x = torch.randn(12, 64)
    with pytest.raises(RuntimeError, match="gemm_8da4w: scales_and_zeros must be"):
        torch.ops.torchchat.gemm_8da4w(x, w.weight, w.scales_and_zeros[:1].contiguous(), 32)
    with pytest.raises(
        RuntimeError, match="gemm_int4: N 32 must be a multiple of 16, K 64 of group 48"
    ):
        torch.ops.torchchat.gemm_int4(x.bfloat16(), w.weight, w.scales_and_zeros, 48)


@needs_bf16
@pytest.mark.usefixtures("isa")
def test_grouped_ops_reject_mismatched_lists():
    """A grouped call with no weights, too few scales or weights of another width is a one-line
    error naming the op, not a read past a list's end."""
    a = Int4Linear.from_float(torch.nn.Linear(64, 32, bias=False), 32)
    b = Int4Linear.from_float(torch.nn.Linear(96, 32, bias=False), 32)
    q = Int8Linear.from_float(torch.nn.Linear(64, 32, bias=False), 0)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="torchchat::linear: no weights"):
        torch.ops.torchchat.linear(x, [])
    with pytest.raises(RuntimeError, match="linear_int8: 2 weights but 1 scales tensors"):
        torch.ops.torchchat.linear_int8(x, [q.weight, q.weight], [q.scales], 0)
    with pytest.raises(RuntimeError, match="linear_int4: 1 weights but 0 scales tensors"):
        torch.ops.torchchat.linear_int4(x, [a.weight], [], 32)
    with pytest.raises(RuntimeError, match="linear_int4: K differs"):
        torch.ops.torchchat.linear_int4(
            x, [a.weight, b.weight], [a.scales_and_zeros, b.scales_and_zeros], 32
        )
    if not kernels.q8_decode(32):
        with pytest.raises(RuntimeError, match="linear_int4_q8: not among the"):
            torch.ops.torchchat.linear_int4_q8(x, [a.weight], [a.scales_and_zeros], 32, False)
        return
    with pytest.raises(RuntimeError, match="linear_int4_q8: 1 weights but 0 scales tensors"):
        torch.ops.torchchat.linear_int4_q8(x, [a.weight], [], 32, True)
    with pytest.raises(RuntimeError, match="linear_int4_q8: K differs"):
        torch.ops.torchchat.linear_int4_q8(
            x, [a.weight, b.weight], [a.scales_and_zeros, b.scales_and_zeros], 32, False
        )


@needs_bf16
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.usefixtures("isa")
def test_int4_module_with_and_without_kernel_agree(dynamic):
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 80, bias=True)
    make = Int4Linear.from_float_8da4w if dynamic else Int4Linear.from_float
    q = on_kernels(make(lin, 32))
    x = torch.randn(1, 2, 96)
    fast = q(x)
    with kernels.disabled():
        slow = q(x)  # aten::_weight_int4pack_mm_for_cpu, bf16 output
    assert fast.shape == slow.shape == (1, 2, 80)
    assert max_rel(fast, slow) < 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "b,h,kv,s,t,d",
    [
        (1, 12, 12, 1, 128, 64),
        (2, 8, 2, 3, 50, 48),
        (1, 4, 4, 8, 20, 16),
        (1, 4, 2, 1, 300, 128),
        (1, 2, 1, 2, 40, 200),  # head dims off the 16-lane chunks, up to 256
    ],
)
@pytest.mark.usefixtures("isa")
def test_attention_matches_plain_matmuls(dtype, tol, b, h, kv, s, t, d):
    torch.manual_seed(t)
    q = torch.randn(b, h, s, d).to(dtype)
    cache_k, cache_v = torch.randn(2, b, kv, t + 7, d).to(dtype)
    k, v = cache_k[:, :, :t], cache_v[:, :, :t]  # a span of a longer cache
    pos = torch.randint(0, t, (b, s))
    mask = (torch.arange(t)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
    y = kernels.attention(q, k, v, mask)
    reference = attend_rows(q.float(), k.float(), v.float(), mask)
    assert y.dtype == dtype
    assert (y.float() - reference).abs().max().item() < tol


@pytest.mark.usefixtures("isa")
def test_attention_reads_only_open_positions_and_zeroes_closed_rows():
    """A mask with holes (batched rows of other lengths, padding) and a cache mostly past the
    last open position; a row with nothing open gives zeros."""
    torch.manual_seed(5)
    q = torch.randn(1, 4, 3, 64)
    k, v = torch.randn(2, 1, 2, 1000, 64)
    mask = torch.rand(1, 1, 3, 1000) < 0.3
    mask[..., 37:] = False  # the rest of the cache is never read
    mask[0, 0, 0, :5] = True
    mask[0, 0, 2] = False
    y = kernels.attention(q, k, v, mask)
    reference = attend_rows(q, k, v, mask)
    assert (y[:, :, :2] - reference[:, :, :2]).abs().max().item() < 1e-6
    assert torch.equal(y[:, :, 2], torch.zeros(1, 4, 64))
    closed = ~(mask[0, 0, 0] | mask[0, 0, 1])  # where no row looks
    closed[37:] = True
    k[..., closed, :] = float("nan")  # positions no row attends to: no effect
    v[..., closed, :] = float("nan")
    assert torch.equal(kernels.attention(q, k, v, mask), y)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.usefixtures("isa")
def test_paged_attention_reads_the_pool_in_place(dtype, tol):
    """Sequences whose positions lie scattered over a pool (rows (R, KVH, D)), read through
    their row index: the same as attention over a gathered copy, to the same rounding; a row
    index outside the pool is refused."""
    torch.manual_seed(3)
    pool_k, pool_v = torch.randn(2, 300, 2, 64).to(dtype)
    index = torch.stack([torch.randperm(300)[:90] for _ in range(3)])
    q = torch.randn(3, 8, 5, 64).to(dtype)  # three sequences, 5 query tokens each (a chunk)
    ends = torch.tensor([90, 41, 7])  # each sequence's length; the rest of its index is padding
    pos = ends[:, None] - 5 + torch.arange(5)
    mask = (torch.arange(90)[None, None] <= pos[:, :, None]).unsqueeze(1)
    y = kernels.attention_paged(q, pool_k, pool_v, index, mask)
    k, v = (p[index].transpose(1, 2) for p in (pool_k, pool_v))  # (B, KVH, T, D) copies
    gathered = torch.ops.torchchat.attention(q, k.contiguous(), v.contiguous(), mask, 64**-0.5)
    assert torch.equal(y, gathered)
    reference = attend_rows(q.float(), k.float(), v.float(), mask)
    assert (y.float() - reference).abs().max().item() < tol
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.attention_paged(q, pool_k, pool_v, index + 300, mask)


@pytest.mark.usefixtures("isa")
def test_ops_decline_what_they_do_not_cover():
    x = torch.randn(9, 16)  # more rows than a decode step
    assert kernels.float_linear(x, torch.randn(4, 16)) is None
    assert kernels.float_linear(torch.randn(1, 16), torch.randn(4, 16).bfloat16()) is None
    q = Int8Linear.from_float(torch.nn.Linear(48, 8, bias=False), 48)  # group not a power of 2
    assert kernels.int8_linear(torch.randn(1, 48), q.weight, q.scales, 48) is None
    with kernels.disabled():
        assert kernels.float_linear(torch.randn(1, 16), torch.randn(4, 16)) is None


def test_a_missing_library_falls_back_and_a_forced_level_fails_in_one_line(monkeypatch, capsys):
    """pip builds the kernels; without them (no compiler at install) torch's ops run, with a
    status line for -v and nothing on stderr. A level forced by TORCHCHAT_ISA that this machine
    does not run is one TorchchatError naming it and the levels it has."""
    from torchchat.kernels import library

    monkeypatch.delenv(library.ENV_ISA, raising=False)
    monkeypatch.setenv(library.ENV, "1")
    real = library._load_library
    monkeypatch.setattr(library, "_load_library", lambda: "not built (no compiler)")
    state = library._initial()
    assert (state.level, state.bits, state.available) == ("off", 0, ("off",))
    assert "CPU kernels off (not built (no compiler))" in state.status
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(library.ENV_ISA, "avx512")
    with pytest.raises(TorchchatError, match=r"^TORCHCHAT_ISA=avx512: CPU kernels not built"):
        library._initial()
    monkeypatch.setattr(library, "_load_library", real)
    # a level of another architecture (neon on x86, avx512 on ARM)
    missing = next(level for level in library.LEVELS if level not in kernels.available_isas())
    monkeypatch.setenv(library.ENV_ISA, missing)
    with pytest.raises(TorchchatError, match=rf"^TORCHCHAT_ISA={missing}: not available on this "
                       r"machine; available: .*scalar, off$"):  # fmt: skip
        library._initial()
    monkeypatch.setenv(library.ENV_ISA, "sse9")
    with pytest.raises(TorchchatError, match="unknown level"):
        library._initial()
    monkeypatch.delenv(library.ENV_ISA)
    monkeypatch.setenv(kernels.ENV, "0")
    assert library._initial().level == "off"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_every_level_the_cpu_runs_was_built():
    """setup.py leaves out a level whose folder fails to compile (an old compiler without its
    flags), and the kernel tests then skip that level as if the CPU lacked it: on this CPU, each
    level whose instructions /proc/cpuinfo lists must be there."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    needs = {
        "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
        "avx2": {"avx2", "fma", "f16c"},
        "neon": {"asimdhp", "asimddp", "fphp"},
    }
    runs = {level for level, need in needs.items() if need <= flags}
    assert runs <= set(kernels.available_isas())


def small_model(quantize_spec: str | None = None, kernels_on: bool = True) -> Transformer:
    args = random_args(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=128)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=3))
    if quantize_spec:
        quantize(model, load_quantize_spec(quantize_spec))
    if kernels_on:
        on_kernels(model)
    model.setup_caches(1, 32)
    return model.eval()


@torch.inference_mode()
def prefill_then_decode(model: Transformer, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    out = [model(tokens[:, :prompt], torch.arange(prompt))[:, -1]]
    for pos in range(prompt, tokens.shape[1]):
        out.append(model(tokens[:, pos : pos + 1], torch.tensor([pos]))[:, -1])
    return torch.cat(out)


@pytest.mark.parametrize(
    "spec,tol",
    [
        (None, 1e-5),
        # torch's path rounds activations to bf16; decode on the kernels (INT8_Q8) to 8 bits per
        # 32 values, as llama.cpp's Q8_0 (2.5-3% of the largest logit here; 1.2-1.7% on fp32)
        ('{"linear:int8": {"groupsize": 0}}', 4e-2),
        ('{"linear:int8": {"groupsize": 32}}', 4e-2),
        # prefill's integer GEMMs: int4 on activations rounded to 8 bits per 32 values (as
        # llama.cpp's Q4_0 prefill) vs torch's bf16 activations; 8da4w's exact integer products
        # vs torch's bf16-rounded fake-quantized activations, where a small difference flips
        # some of the next layer's int8 codes
        ('{"precision": {"dtype": "bf16"}, "linear:int4": {"groupsize": 32}}', 6e-2),
        ('{"precision": {"dtype": "bf16"}, "linear:8da4w": {"groupsize": 32}}', 6e-2),
        ('{"precision": {"dtype": "bf16"}}', 3e-2),
    ],
)
@pytest.mark.usefixtures("isa")
def test_model_decode_on_kernels_matches_torch_ops(spec, tol):
    if spec and "4" in spec and not kernels.simd_level() & kernels.INT4:
        pytest.skip(f"the {kernels.isa()} kernels have no int4 linear")
    model = small_model(spec)
    if spec and "bf16" in spec:
        model = model.to(torch.bfloat16)
        model.setup_caches(1, 32)
    # a prefill of 10 rows (the many-row paths: oneDNN fp32, bf16 GEMMs on int8 weights, the
    # integer GEMMs of int4 and 8da4w)
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    fast = prefill_then_decode(model, tokens, 10)
    with kernels.disabled():
        slow = prefill_then_decode(model, tokens, 10)
    assert max_rel(fast, slow) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attends_only_the_keys_its_rows_see(dtype, monkeypatch):
    """A 12-token prompt in a 32-position cache: the kernel-backed attention cuts the keys after
    the last one a row sees (the 20 masked ones weigh exp(-inf) = 0). A prompt this short runs on
    torchchat's attention kernel (each row over its own open span; SDPA never called); above
    PREFILL_ATTENTION rows x keys (here forced to 0) SDPA is given 12 keys, not 32. The logits
    are those of attending over the whole cache, to rounding."""
    model = small_model().to(dtype)
    model.setup_caches(1, 32)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(k.shape[2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    tol = 2e-6 if dtype == torch.float32 else 3e-2  # summation order (bf16 rounds each layer)
    with torch.inference_mode():
        on_kernel = model(tokens, torch.arange(12))
        assert not seen
        monkeypatch.setattr(kernel_modules, "PREFILL_ATTENTION", 0)
        cut = model(tokens, torch.arange(12))
        assert seen and set(seen) == {12}
        monkeypatch.setattr(kernel_modules, "_open_keys", lambda k, v, mask: (k, v, mask))
        whole = model(tokens, torch.arange(12))
    assert set(seen) == {12, 32}
    assert max_rel(cut, whole) < tol
    assert max_rel(on_kernel, whole) < tol


@needs_bf16
def test_compiled_decode_on_kernels_matches_eager():
    """fp32 activations with int4 weights: aten's kernel breaks inductor, ours compiles."""
    model = small_model('{"linear:int4": {"groupsize": 32}}')
    tokens = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    eager = prefill_then_decode(model, tokens, 4)
    step = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        model(tokens[:, :4], torch.arange(4))
        compiled = [step(tokens[:, p : p + 1], torch.tensor([p]))[:, -1] for p in range(4, 8)]
    assert max_rel(torch.cat(compiled), eager[1:]) < 1e-5


def test_exported_program_holds_only_torch_ops():
    # export takes the plain model the builder makes: no kernel-backed modules, no global flag
    model = small_model('{"linear:int8": {"groupsize": 0}}', kernels_on=False)
    program = export_program(model, 32)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "torchchat" in t]
    assert any("_weight_int8pack_mm" in t for t in targets)


@pytest.mark.slow
def test_greedy_tokens_match_with_kernels_off():
    """stories260K, fp32, 64 greedy tokens: the same text on the fused step (the default), on
    torchchat's kernels through the modules, on torch's ops, and on every other level this
    machine runs (the scalar reference included)."""
    import os

    cmd = ["generate", STORIES_BIN, "--prompt", "Once upon a time", "--temperature", "0",
           "--max-new-tokens", "64"]  # fmt: skip
    fused = run_torchchat(*cmd)
    on = run_torchchat(*cmd, "--no-fused-decode")
    off = run_torchchat(*cmd, env={**os.environ, kernels.ENV: "0"})
    assert fused.returncode == on.returncode == off.returncode == 0, on.stderr + off.stderr
    assert fused.stdout == on.stdout == off.stdout and len(on.stdout.split()) > 20
    levels = [lv for lv in kernels.available_isas() if lv not in ("off", kernels.isa())]
    assert "scalar" in levels
    for level in levels:
        run = run_torchchat(*cmd, env={**os.environ, kernels.ENV_ISA: level})
        assert run.returncode == 0 and run.stdout == fused.stdout, (level, run.stderr)
