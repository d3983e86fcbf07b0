"""torchchat's own CPU kernels for the decode step and prefill, as torch custom ops.

pip builds them at install time (setup.py: ops.cpp over the torch-free core in cpu/, one folder
per instruction set); library.py loads them and picks the instruction-set level once
(`TORCHCHAT_ISA=avx512|avx2|neon|scalar|off`, `TORCHCHAT_KERNELS=0` = off). `isa()` names the
level in use, `status()` says in one line what runs and why (for -v).

Models call them through `float_linear`, `int8_linear` and `int4_linear`, which return None when
the kernels do not apply (no kernels for this CPU, too many rows, a dtype they do not cover,
the level `off`, or inside `disabled()`); the caller then runs torch's op. Runtimes swap
kernel-backed modules into a plain model (torchchat/runtime/kernel_modules.py); export takes the
plain model, so its programs hold only torch's ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from torchchat.kernels import library
from torchchat.kernels.library import ENV, ENV_ISA  # noqa: F401  (re-exported)

MAX_ROWS = 8  # the C++ kMaxRows: more tokens at once is prefill, where torch's GEMM wins
STEP_ROWS = 3 * MAX_ROWS  # the C++ kStepRows: tokens of one decode_layers_paged call

# simd_level bits: the families of kernels the selected table runs (cpu/common/kernels.h's
# kFewRows, kBf16, kInt8Gemm, kBf16Gemm, kGgml, kGgmlGemm, kInt4Q8Gemm). Every level has the first
# three on a CPU it runs on.
FEW_ROWS = 1  # float and int8 linears, attention, the fused decode step
INT4 = 2  # int4 linears, bf16 GEMMs on int4/int8 tiles
INT8_GEMM = 4  # 8da4w's integer prefill GEMM
BF16_GEMM = 8  # bf16 dot products in hardware; without: prefill's bf16/fp16 GEMMs widened to fp32
GGML = 16  # GGUF's block-quantized weights in place (torchchat.kernels.ggml)
GGML_GEMM = 32  # GGUF K-quant prefill in integers, tokens in lanes (ggml_gemm_types: VNNI
# Q4_K/Q5_K/Q6_K, AVX2 Q5_K/Q6_K)
INT4_Q8_GEMM = 64  # int4 and GGUF prefill in integers on 8-bit activations (as Q4_0 x Q8_0)
Q8_DECODE = 128  # int4 and 8da4w decode in integers too: the same activations and sums as prefill
F32_GEMM = 256  # prefill's fp32 GEMMs (fp32 weights, widened bf16/fp16/int8/GGUF tiles) on our own
INT8_Q8 = 512  # int8 decode in integers: x rounded to 8 bits per 32 values (as Q8_0 x Q8_0)
INT8_Q8_GEMM = 1024  # int8 prefill in integers on the same 8-bit activations
FEW_8DA4W = 3  # up to this many rows the grouped 8da4w decode op (ops.cpp kFew8da4w)

_enabled = True


def simd_level() -> int:
    """Load the kernels (once); the selected level's feature bits, 0 if the kernels are off.
    (torch.compile traces it as a read of the chosen level: the runtimes call it before they
    compile. Not marked with torch.compiler.assume_constant_result, which imports torch._dynamo:
    ~1 s and ~70 MB of every process, compiled or not.)"""
    return library.current().bits


def isa() -> str:
    """The instruction-set level the kernels run: "avx512", "scalar", ... or "off"."""
    return library.current().level


def status() -> str:
    """One line on what runs the kernels and why (the CLI prints it under -v)."""
    return library.current().status


def select_isa(level: str) -> None:
    """Run the ops on `level`'s kernels ("off": torch's ops) from now on; a TorchchatError if
    this machine does not run it. Tests use it to run every level in one process."""
    library.use(level)


def available_isas() -> tuple[str, ...]:
    """The levels this machine runs, fastest first, "off" last."""
    return library.current().available


def describe() -> str:
    """What runs the decode step's linears on this machine, for reports."""
    level = simd_level()
    if not level:
        return "off (torch's kernels)"
    if isa() == "scalar":
        return "scalar (reference kernels, slow)"
    gguf = int(torch.ops.torchchat.ggml_gemm_types())
    return f"{isa()} ({library.describe_bits(level, gguf)})"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run (and trace) with torch's ops only, e.g. for torch.export."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _rows(x: Tensor, need: int, dims: tuple | None = None, most: int = MAX_ROWS) -> int | None:
    """Rows of x as a 2-D matrix (the product of `dims`, by default all but the last) if the
    kernels take it: a CPU tensor of static shape with at most `most` rows, kernels enabled
    and built with the `need` level bit."""
    if not _enabled or x.device.type != "cpu":
        return None
    rows = 1
    for d in x.shape[:-1] if dims is None else dims:
        if not isinstance(d, int):  # a dynamic (symbolic) size: prefill, leave it to torch
            return None
        rows *= d
    if rows > most or not simd_level() & need:
        return None
    return rows


def available(need: int = FEW_ROWS) -> bool:
    """Whether the kernels built with the `need` level bit are on (built, loaded, not disabled)."""
    return _enabled and simd_level() & need != 0


def takes_rows(x: Tensor, need: int = FEW_ROWS) -> bool:
    """Whether the few-row (decode) kernels built with the `need` level bit take x."""
    return _rows(x, need) is not None


def _split(x: Tensor, y: Tensor, weights: Sequence[Tensor]) -> list[Tensor]:
    """The ops' (rows of x, all weights' rows) result -> one (..., rows) view per weight."""
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return [y] if len(weights) == 1 else list(y.split([w.shape[0] for w in weights], dim=-1))


def float_linears(x: Tensor, weights: Sequence[Tensor]) -> list[Tensor] | None:
    """[x @ w.T for w in weights] in one call (a layer's q, k, v: one pass over the threads for
    all three), for fp32/bf16/fp16 x and row-major weights of x's dtype and width, or None."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    rows = _rows(x, FEW_ROWS)
    if rows is None:
        return None
    for w in weights:
        if type(w) not in (Tensor, torch.nn.Parameter):  # e.g. torchao's quantized tensors
            return None
        if w.dtype != x.dtype or w.dim() != 2 or w.stride(1) != 1 or w.shape[1] != x.shape[-1]:
            return None
        if w.device.type != "cpu":
            return None
    y = torch.ops.torchchat.linear(x.reshape(rows, x.shape[-1]), weights)
    return _split(x, y, weights)


def float_linear(x: Tensor, weight: Tensor) -> Tensor | None:
    """x @ weight.T for fp32/bf16/fp16 x and weight of the same dtype, or None."""
    ys = float_linears(x, [weight])
    return None if ys is None else ys[0]


def int8_linears(
    x: Tensor, weights: Sequence[Tensor], scales: Sequence[Tensor], groupsize: int
) -> list[Tensor] | None:
    """x @ (w x s).T for each int8 weight w (all of one width) and its scales s (all fp32 or all
    bf16; per row for groupsize 0, else per group) in one call, or None. Results are
    (..., rows of w) in x's dtype. On a level with INT8_Q8, where the width and the group are
    multiples of 32, x is first rounded to 8 bits per 32 values (as int4_gemm_q8 rounds it) and
    each block's code products summed exactly, as llama.cpp's Q8_0 decode; else x stays fp32."""
    if groupsize and (groupsize < 16 or groupsize & (groupsize - 1)):
        return None  # the kernel takes per-row scales or power-of-two groups of 16 or more
    if not x.is_floating_point():
        return None
    rows = _rows(x, FEW_ROWS)
    if rows is None:
        return None
    cols, sdt = weights[0].shape[1], scales[0].dtype
    if cols % (groupsize or 16) or sdt not in (torch.float32, torch.bfloat16):
        return None
    for w, s in zip(weights, scales, strict=True):
        if w.dtype != torch.int8 or w.shape[1] != cols or s.dtype != sdt or not s.is_contiguous():
            return None
    y = torch.ops.torchchat.linear_int8(x.reshape(rows, x.shape[-1]), weights, scales, groupsize)
    return _split(x, y, weights)


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor, groupsize: int) -> Tensor | None:
    """x @ (int8 weight x scales).T, per-row (groupsize 0) or per-group scales, or None. The
    result is (..., weight rows) in x's dtype."""
    ys = int8_linears(x, [weight], [scales], groupsize)
    return None if ys is None else ys[0]


def int4_linears(
    x: Tensor, packed: Sequence[Tensor], scales_and_zeros: Sequence[Tensor], groupsize: int
) -> list[Tensor] | None:
    """x @ W.T for each int4 W (all of one width, in torch's CPU pack layout: W = (q - 8) *
    scale + zero) in one call, or None. Activations are rounded to bf16 first, as with
    aten::_weight_int4pack_mm_for_cpu. Results are (..., rows of W) in x's dtype."""
    if not x.is_floating_point():
        return None
    rows = _rows(x, INT4)
    if rows is None:
        return None
    for w, sz in zip(packed, scales_and_zeros, strict=True):
        if w.dtype != torch.uint8 or sz.dtype != torch.bfloat16:
            return None
    y = torch.ops.torchchat.linear_int4(
        x.reshape(rows, x.shape[-1]), packed, scales_and_zeros, groupsize
    )
    return _split(x, y, packed)


def int4_linears_q8(
    x: Tensor,
    packed: Sequence[Tensor],
    scales_and_zeros: Sequence[Tensor],
    groupsize: int,
    dynamic: bool,
) -> list[Tensor] | None:
    """Decode's x @ W.T for each int4 W (as int4_linears) in integers, or None where the level
    does not decode so (q8_decode): x rounded to 8 bits per 32 values as int4_gemm_q8 does, or
    per token as gemm_8da4w does (`dynamic`), the same sums as those ops."""
    if not x.is_floating_point() or not q8_decode(groupsize):
        return None
    rows = _rows(x, Q8_DECODE)
    if rows is None or (dynamic and rows > FEW_8DA4W):
        return None  # 8da4w: more rows on gemm_8da4w's GEMM (ops.cpp kFew8da4w)
    for w, sz in zip(packed, scales_and_zeros, strict=True):
        if w.dtype != torch.uint8 or sz.dtype != torch.bfloat16:
            return None
    y = torch.ops.torchchat.linear_int4_q8(
        x.reshape(rows, x.shape[-1]), packed, scales_and_zeros, groupsize, dynamic
    )
    return _split(x, y, packed)


def int4_linear(
    x: Tensor, packed: Tensor, scales_and_zeros: Tensor, groupsize: int
) -> Tensor | None:
    """x @ W.T for int4 weights in torch's CPU pack layout, or None (see int4_linears)."""
    ys = int4_linears(x, [packed], [scales_and_zeros], groupsize)
    return None if ys is None else ys[0]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, most: int = MAX_ROWS) -> Tensor | None:
    """softmax(q k^T / sqrt(D), where mask) v for at most `most` query rows (B x S), or None:
    q (B, H, S, D); k, v (B, KVH, T, D) (grouped-query when KVH < H), rows of D contiguous; mask
    bool, (1 or B, 1, S, T). Each query row is computed on its own over the span of keys its
    mask row leaves open, so its result does not depend on the batch it is in."""
    if q.dtype != k.dtype or not q.is_floating_point() or mask.dtype != torch.bool:
        return None
    if q.shape[-1] > 256:  # the kernel keeps a row of q and of the output in registers
        return None
    if k.stride(-1) != 1 or v.stride() != k.stride():  # rows of D contiguous, any apart
        return None
    if mask.stride(-1) != 1 or _rows(q, FEW_ROWS, (q.shape[0], q.shape[2]), most) is None:
        return None
    return torch.ops.torchchat.attention(q, k, v, mask, q.shape[-1] ** -0.5)


def attention_paged(q: Tensor, k: Tensor, v: Tensor, index: Tensor, mask: Tensor) -> Tensor | None:
    """`attention` over a paged pool read in place, or None: k, v (rows, KVH, D), the pool;
    index (B, T) int64, the pool row of each sequence's positions 0..T-1. Any number of query
    rows (each computed on its own: a row's result does not depend on the batch it is in)."""
    if q.dtype != k.dtype or not q.is_floating_point() or mask.dtype != torch.bool:
        return None
    if q.shape[-1] > 256 or k.stride(-1) != 1 or v.stride() != k.stride():
        return None
    if mask.stride(-1) != 1 or _rows(q[:1, :1, :1], FEW_ROWS) is None:  # kernels usable here
        return None
    return torch.ops.torchchat.attention_paged(q, k, v, index, mask, q.shape[-1] ** -0.5)


def int4_blocked_scales(scales_and_zeros: Tensor) -> Tensor:
    """int4 (scale, zero) pairs from torch's layout (groups, N, 2) to the one decode_layers reads:
    each 64-row block's pairs together, group after group (cpu/common/kernels.h, int4_scale_offset)."""
    groups, n, _ = scales_and_zeros.shape
    full = n // 64 * 64
    blocks = scales_and_zeros[:, :full].reshape(groups, n // 64, 64, 2).transpose(0, 1)
    tail = scales_and_zeros[:, full:]  # the last block's bs < 64 rows, also group after group
    return torch.cat([blocks.reshape(-1), tail.reshape(-1)]).view(groups, n, 2)


# decode_layers' kinds of weights (cpu/common/step.h's WeightKind)
FLOAT_WEIGHTS, INT8_WEIGHTS, INT4_WEIGHTS, INT4_WEIGHTS_INT8_ACTIVATIONS, GGML_WEIGHTS = range(5)


def decode_layers_needs(kind: int) -> int:
    """The level bit `decode_layers` needs for a kind of weights."""
    if kind == GGML_WEIGHTS:
        return GGML
    return INT4 if kind >= INT4_WEIGHTS else FEW_ROWS


def decode_layers(
    x: Tensor,
    norms: Sequence[Tensor],
    eps: float,
    freqs: Tensor,
    mask: Tensor,
    pos: Tensor,
    k_caches: Sequence[Tensor],
    v_caches: Sequence[Tensor],
    weights: Sequence[Tensor],
    scales: Sequence[Tensor],
    kind: int,
    groupsize: int,
    n_heads: int,
    types: Sequence[int] = (),
) -> Tensor | None:
    """One token's embedding x (1, 1, dim) through all of a model's layers in one call, or None
    when the kernels are off: each layer's RMSNorm, q/k/v, RoPE, cache write at `pos`,
    attention, wo, residual, RMSNorm, w1/w3, SiLU gate, w2 and residual, rounded where the eager
    modules round. `weights` holds 7 a layer (wq, wk, wv, wo, w1, w3, w2), all of one `kind`,
    `scales` theirs (none for float weights and GGUF blocks; int4's as `int4_blocked_scales` lays
    them out), `types` GGUF blocks' ggml type ids (one a weight); the caches are written in
    place."""
    if _rows(x, decode_layers_needs(kind)) is None or torch.compiler.is_compiling():
        return None
    return torch.ops.torchchat.decode_layers(
        x, norms, eps, freqs, mask, pos, k_caches, v_caches, weights, scales, kind, groupsize,
        n_heads, list(types),
    )  # fmt: skip


def decode_layers_paged(
    x: Tensor,
    norms: Sequence[Tensor],
    eps: float,
    freqs: Tensor,
    pos: Tensor,
    index: Tensor,
    k_pools: Sequence[Tensor],
    v_pools: Sequence[Tensor],
    weights: Sequence[Tensor],
    scales: Sequence[Tensor],
    kind: int,
    groupsize: int,
    n_heads: int,
    types: Sequence[int] = (),
) -> Tensor | None:
    """`decode_layers` for one token of each of up to STEP_ROWS sequences in a paged KV pool:
    x (M, dim) their embeddings, pos (M,) their positions, index (M, T) the pool rows of each
    one's positions 0..T-1 (its block table spelled out); each token attends its sequence's
    positions up to its own, its keys and values written into the pools (rows, kv_heads,
    head_dim) in place. A row's result does not depend on the others in the call, up to the
    rounding of the linears' kernels for another row count. None when the kernels are off."""
    if _rows(x, decode_layers_needs(kind), most=STEP_ROWS) is None:
        return None
    if torch.compiler.is_compiling():
        return None
    return torch.ops.torchchat.decode_layers_paged(
        x, norms, eps, freqs, pos, index, k_pools, v_pools, weights, scales, kind, groupsize,
        n_heads, list(types),
    )  # fmt: skip


def int4_gemm(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor | None:
    """x @ W.T for many rows (prefill) of int4 weights in torch's CPU pack layout, as bf16 GEMMs
    on tiles of W dequantized on the fly (bf16 activations and result), or None."""
    if packed.dtype != torch.uint8 or scales_and_zeros.dtype != torch.bfloat16:
        return None
    if not prefill_ok(x) or not simd_level() & INT4:
        return None
    xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.torchchat.gemm_int4(xb, packed, scales_and_zeros, groupsize)
    return y.reshape(*x.shape[:-1], packed.shape[0])


def int8_gemm(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor | None:
    """bf16 x @ W.T for many rows (prefill) of int8 weights with per-row scales, as bf16 GEMMs on
    tiles of the codes, each output rounded as bf16(bf16(x @ codes.T) * bf16(scale)); or None."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.int8 or weight.dim() != 2:
        return None
    if not weight.is_contiguous():
        return None
    if weight.numel() < 1 << 22 and simd_level() & BF16_GEMM:
        return None  # stories110M's 768 x 768, 768 x 2048: one bf16 GEMM on all was faster
    if not prefill_ok(x) or not simd_level() & INT4:
        return None
    y = torch.ops.torchchat.gemm_int8(x.reshape(-1, x.shape[-1]), weight, scales)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gemm_8da4w(
    x: Tensor, packed: Tensor, scales_and_zeros: Tensor, groupsize: int
) -> Tensor | None:
    """8da4w's x @ W.T for many rows (prefill) in integers, or None: x quantized per token to
    int8 (as quant.primitives.quantize_per_token_int8), int4 weights (zero points 0) in torch's
    CPU pack layout, products summed exactly with AVX512-VNNI and scaled once in fp32. The
    result is (..., packed rows) in x's dtype."""
    if packed.dtype != torch.uint8 or scales_and_zeros.dtype != torch.bfloat16 or groupsize % 4:
        return None
    if not prefill_ok(x) or not simd_level() & INT8_GEMM:
        return None
    if x.numel() <= MAX_ROWS * x.shape[-1] and not q8_decode(groupsize):
        return None  # a few rows (decode): the int4 kernel on fake-quantized activations
    y = torch.ops.torchchat.gemm_8da4w(
        x.reshape(-1, x.shape[-1]), packed, scales_and_zeros, groupsize
    )
    return y.reshape(*x.shape[:-1], packed.shape[0])


def int4_gemm_q8(
    x: Tensor, packed: Tensor, scales_and_zeros: Tensor, groupsize: int
) -> Tensor | None:
    """int4 x @ W.T for many rows (prefill) in integers, or None: x rounded to 8 bits per 32
    values (scale max|x| / 127, as llama.cpp's Q8_0 activations for Q4_0 weights), the codes'
    products summed exactly and scaled in fp32 (cpu/common/kernels.h gives the sum). The result
    is (..., packed rows) in x's dtype."""
    if packed.dtype != torch.uint8 or scales_and_zeros.dtype != torch.bfloat16 or groupsize % 32:
        return None
    if not prefill_ok(x) or not simd_level() & INT4_Q8_GEMM:
        return None
    if x.numel() <= MAX_ROWS * x.shape[-1] and not q8_decode(groupsize):
        return None  # a few rows (decode): the int4 kernel on bf16 activations
    y = torch.ops.torchchat.gemm_int4_q8(
        x.reshape(-1, x.shape[-1]), packed, scales_and_zeros, groupsize
    )
    return y.reshape(*x.shape[:-1], packed.shape[0])


def int8_gemm_q8(x: Tensor, weight: Tensor, scales: Tensor, groupsize: int) -> Tensor | None:
    """int8 x @ (W x scales).T for many rows (prefill) in integers, or None: x rounded to 8 bits
    per 32 values as int8 decode rounds it (int8_linear), each block's code products summed
    exactly and scaled in fp32 (cpu/common/kernels.h gives the sum). The result is (..., rows of
    W) in x's dtype."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if scales.dtype not in (torch.float32, torch.bfloat16) or groupsize % 32:
        return None
    if weight.shape[1] % 32 or not prefill_ok(x) or not simd_level() & INT8_Q8_GEMM:
        return None
    y = torch.ops.torchchat.gemm_int8_q8(
        x.reshape(-1, x.shape[-1]), weight, scales.contiguous(), groupsize
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """The model's RMSNorm of x's rows in one op (the decode step's arithmetic: fp32 mean of
    squares, the normalized value rounded to x's dtype, times the weight, rounded), or None."""
    if not prefill_ok(x) or weight.dtype != x.dtype or not x.is_floating_point():
        return None
    return torch.ops.torchchat.rms_norm(x, weight, eps)


def silu_mul(a: Tensor, b: Tensor) -> Tensor | None:
    """The feed-forward gate silu(a) * b in one op (SiLU in fp32 on the level's vector exp,
    rounded to the dtype, times b, rounded), or None."""
    if not prefill_ok(a) or a.shape != b.shape or a.dtype != b.dtype:
        return None
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return torch.ops.torchchat.silu_mul(a, b)


def rope(x: Tensor, freqs: Tensor) -> Tensor | None:
    """x (B, S, heads, head_dim) rotated as model.transformer.apply_rope in one op, or None."""
    if not prefill_ok(x) or freqs.dtype != torch.float32 or x.dim() != 4:
        return None
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or freqs.dim() not in (3, 4):
        return None
    return torch.ops.torchchat.rope(x, freqs)


def q8_decode(groupsize: int) -> bool:
    """Whether int4 and 8da4w decode (a few rows) run in integers on this level, as their prefill
    does (the fused step decides the same way): groups of whole 32-value blocks."""
    return bool(simd_level() & Q8_DECODE) and groupsize % 32 == 0


def prefill_ok(x: Tensor) -> bool:
    """Whether the many-row (prefill) fast paths below apply: eager code on CPU, kernels on."""
    return (
        _enabled
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and simd_level() & FEW_ROWS != 0
    )


def wide_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x @ weight.T + bias for many rows of bf16/fp16 on a level without bf16 dot products, as
    fp32 GEMMs on tiles of the weights widened just before (the same products, summed in fp32
    and rounded once, as torch's GEMM does), or None where torch's own GEMM is the one to run."""
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return None
    if not prefill_ok(x) or simd_level() & BF16_GEMM or x.numel() <= MAX_ROWS * x.shape[-1]:
        return None
    if type(weight) not in (Tensor, torch.nn.Parameter) or weight.dim() != 2:
        return None
    y = torch.ops.torchchat.gemm_wide(x.reshape(-1, x.shape[-1]), weight)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def fp32_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x @ weight.T + bias for fp32 on torchchat's GEMM where the level has one (F32_GEMM: AVX2,
    1.1-1.4x oneDNN's on a Zen 3 at 64 tokens, cpu/avx2/table.cpp), else through oneDNN, or None.
    torch's F.linear takes MKL's sgemm, which ran at 120 GFLOP/s on an AMD Zen 4 (MKL picks its
    AVX2 code there), oneDNN's at 2.3x that. Eager only: inductor lowers this op only for frozen
    (constant) weights."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not prefill_ok(x):
        return None
    if type(weight) not in (Tensor, torch.nn.Parameter):
        return None
    if simd_level() & F32_GEMM and weight.dim() == 2:
        y = torch.ops.torchchat.gemm_f32(x.reshape(-1, x.shape[-1]), weight)
        y = y.reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
