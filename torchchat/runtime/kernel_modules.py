"""torchchat's CPU kernels swapped into a plain model when a runtime is built.

The model (torchchat/model) and the quantized linears (torchchat/quant) compute with torch's ops
only; `use_kernels` gives their modules subclasses that first try torchchat's kernels
(torchchat/kernels) and fall back to the plain computation wherever a kernel does not apply
(too many rows, a dtype it does not cover, another device). Parameters, buffers and state-dict
names stay the same: only the class changes, as quantization swaps modules.

`decode_plan` asks each linear what it gives the fused one-token step (`fused`, defined on the
exact class: a subclass may compute something else) and gathers a model's tensors for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchchat import kernels
from torchchat.kernels import ggml
from torchchat.kernels.fused import DecodePlan, FusedLinear, WeightKind
from torchchat.model.transformer import (
    Attention,
    AttentionGroup,
    FeedForward,
    KVCache,
    PagedStep,
    PrefixSplit,
    RMSNorm,
    Transformer,
    TransformerBlock,
)
from torchchat.pages import huge_copies
from torchchat.quant.gguf_blocks import GGUFEmbedding, GGUFLinear
from torchchat.quant.linear import Int4Linear, Int8Linear, kernel_dtype
from torchchat.quant.primitives import quantize_activations_per_token

# Paged attention groups of up to this many query tokens a sequence read the pool in place
# (the kernel takes query rows one by one: from ~6 tokens a chunk on, torch's attention on a
# gathered copy is faster -- 930 positions, 12 heads of 64, 2 threads: 4 tokens 8.1 against
# 9.3 ms a layer for 15 sequences, 8 tokens 12.2 against 11.0, 32 tokens 36 against 19; decode,
# 8 sequences: 2.7 against 6.5).
PAGED_QUERIES = 4
# Prefill attention of up to this many query rows x keys runs on the kernel as decode does (each
# row over the keys its mask leaves open, a causal prompt's triangle): stories110M's 12 heads of
# 64, 2 threads, bf16 and fp32 alike: 16 tokens 15-19 us against 37-45 for aten's SDPA, 64 tokens
# 113-118 against 160, 128 tokens 417-424 against 481-686; 256 tokens 1650 against 1530 (its
# blocked kernel ahead).
PREFILL_ATTENTION = 128 * 128


def _finish(y: Tensor, m: nn.Module) -> Tensor:
    return y if m.bias is None else y + m.bias


class KernelLinear(nn.Linear):
    """Float weights: torchchat's GEMV for a few rows, oneDNN's fp32 GEMM for prefill (bf16 and
    fp16 too where the CPU has no bf16 dot products, on widened tiles)."""

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.float_linear(x, self.weight)
        if y is not None:
            return _finish(y, self)
        y = kernels.fp32_gemm(x, self.weight, self.bias)  # fp32 prefill on CPU
        if y is None:  # bf16/fp16 prefill on a CPU without bf16 dot products
            y = kernels.wide_gemm(x, self.weight, self.bias)
        return super().forward(x) if y is None else y

    @staticmethod
    def forward_many(x: Tensor, linears: Sequence[KernelLinear]) -> list[Tensor] | None:
        """Several of one width on the same x in one kernel call, or None."""
        ys = kernels.float_linears(x, [m.weight for m in linears])
        return None if ys is None else [_finish(y, m) for y, m in zip(ys, linears, strict=True)]

    def fused(self, dtype: torch.dtype, may_pad: bool = False) -> FusedLinear | None:
        """Float weights of the activation dtype, no bias."""
        if self.bias is not None or self.weight.dtype != dtype:
            return None
        if type(self.weight) not in (Tensor, nn.Parameter):  # e.g. torchao's quantized tensors
            return None
        return FusedLinear(WeightKind.FLOAT, 0, self.weight)


class KernelInt8Linear(Int8Linear):
    """int8 weights: torchchat's GEMV for a few rows (in integers where the level decodes so);
    for prefill, GEMMs in integers on the same 8-bit activations where the level has them, else
    (per-channel scales) bf16 GEMMs on the codes (exact in bf16) and then the scales."""

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.int8_linear(x, self.weight, self.scales, self.groupsize)
        if y is None and x.dim() >= 2:
            y = kernels.int8_gemm_q8(x, self.weight, self.scales, self.groupsize)
        if y is not None:
            return _finish(y, self)
        if self.groupsize or x.dim() < 2 or not kernels.prefill_ok(x):
            return super().forward(x)
        # 1.6-2.5x aten's int8 GEMM here (5632 x 2048, 64-512 rows), more on tiles of the codes
        dt = kernel_dtype(x)
        xb = F.pad(x.to(dt), (0, self.weight.shape[1] - self.in_features))
        y = kernels.int8_gemm(xb, self.weight, self.scales)
        if y is None:
            y = F.linear(xb, self.weight.to(dt)) * self.scales.to(dt)
        return _finish(y.to(x.dtype), self)

    @staticmethod
    def forward_many(x: Tensor, linears: Sequence[KernelInt8Linear]) -> list[Tensor] | None:
        """Several of one width and group size on the same x in one kernel call, or None."""
        if any(m.groupsize != linears[0].groupsize for m in linears):
            return None
        ys = kernels.int8_linears(
            x, [m.weight for m in linears], [m.scales for m in linears], linears[0].groupsize
        )
        return None if ys is None else [_finish(y, m) for y, m in zip(ys, linears, strict=True)]

    def fused(self, dtype: torch.dtype, may_pad: bool = False) -> FusedLinear | None:
        """Per-row scales or power-of-two groups of 16 or more, fp32 or bf16 scales, no bias."""
        g = self.groupsize
        if self.bias is not None or (g and (g < 16 or g & (g - 1))):
            return None
        if self.scales.dtype not in (torch.float32, torch.bfloat16):
            return None
        return FusedLinear(WeightKind.INT8, g, self.weight, self.scales)


class KernelInt4Linear(Int4Linear):
    """int4 weights in torchchat's CPU pack layout: torchchat's GEMV for a few rows (in integers
    where the level decodes so: kernels.q8_decode); for prefill, GEMMs in integers (8da4w's on
    its per-token int8 activations; weight-only int4 on activations rounded to 8 bits per 32
    values, as llama.cpp's Q4_0 prefill), else bf16 GEMMs on tiles of dequantized weights."""

    def forward(self, x: Tensor) -> Tensor:
        y = self._cpu_kernels(x) if self.weight.device.type == "cpu" else None
        if y is None:
            return super().forward(x)
        return _finish(y[..., : self.out_features] if self.n != self.out_features else y, self)

    def _cpu_kernels(self, x: Tensor) -> Tensor | None:
        ys = kernels.int4_linears_q8(
            x, [self.weight], [self.scales_and_zeros], self.groupsize, self.dynamic_activations
        )
        if ys is not None:  # decode in integers
            return ys[0]
        if self.dynamic_activations:
            y = kernels.gemm_8da4w(x, self.weight, self.scales_and_zeros, self.groupsize)
            if y is not None:
                return y
            x = quantize_activations_per_token(x)
        y = kernels.int4_linear(x, self.weight, self.scales_and_zeros, self.groupsize)
        if y is None:
            y = kernels.int4_gemm_q8(x, self.weight, self.scales_and_zeros, self.groupsize)
        if y is None:
            xp = F.pad(x, (0, self.k - self.in_features)) if self.k != self.in_features else x
            y = kernels.int4_gemm(xp, self.weight, self.scales_and_zeros, self.groupsize)
            y = None if y is None else y.to(x.dtype)
        return y

    @staticmethod
    def forward_many(x: Tensor, linears: Sequence[KernelInt4Linear]) -> list[Tensor] | None:
        """Several of one width and scheme on the same x in one kernel call, or None."""
        first = linears[0]
        scheme = (first.groupsize, first.k, first.dynamic_activations)
        if any((m.groupsize, m.k, m.dynamic_activations) != scheme for m in linears):
            return None
        ws, szs = [m.weight for m in linears], [m.scales_and_zeros for m in linears]
        ys = kernels.int4_linears_q8(x, ws, szs, first.groupsize, first.dynamic_activations)
        if ys is not None:  # decode in integers
            return [_finish(y[..., : m.out_features], m) for y, m in zip(ys, linears, strict=True)]
        if first.dynamic_activations and (
            not kernels.takes_rows(x, kernels.INT4) or kernels.q8_decode(first.groupsize)
        ):  # not a decode step on the kernels (no quantization here), or one whose rows are
            # more than the grouped op takes: each on gemm_8da4w, the sums of decode in integers
            # (not the bf16 kernel on fake-quantized rows: a sequence's logits would depend on
            # how many others share its step)
            return None
        xq = quantize_activations_per_token(x) if first.dynamic_activations else x
        ys = kernels.int4_linears(xq, ws, szs, first.groupsize)
        if ys is None:
            return None
        return [_finish(y[..., : m.out_features], m) for y, m in zip(ys, linears, strict=True)]

    def fused(self, dtype: torch.dtype, may_pad: bool = False) -> FusedLinear | None:
        """CPU-packed codes, bf16 scales (or an fp32 model's copy of them), no bias. Padded
        output rows (to 16) come out 0, which only a layer's w1/w3 may have (`may_pad`). The
        scales are a copy laid out by 64-row block (+20% of the weights' bytes; 1.1-1.2x the
        step's int4 read rate)."""
        padded = self.n != self.out_features and not may_pad
        if (
            self.bias is not None
            or self.weight.dtype != torch.uint8
            or padded
            or self.groupsize % 2
        ):
            return None
        sz = _bf16_exactly(self.scales_and_zeros)
        if sz is None:
            return None
        kind = WeightKind.INT4_INT8_ACTIVATIONS if self.dynamic_activations else WeightKind.INT4
        return FusedLinear(kind, self.groupsize, self.weight, kernels.int4_blocked_scales(sz))


class KernelGGUFLinear(GGUFLinear):
    """A GGUF's blocks as they are: decode's few rows on torchchat's integer dot products (x
    quantized per block as ggml does), prefill on integer GEMMs over the same quantized rows
    where the level has one for the type (torchchat::ggml_gemm_types), else GEMMs on tiles
    dequantized just before."""

    def forward(self, x: Tensor) -> Tensor:
        ys = ggml.linears(x, [self.weight], [self.ggml_type])
        y = ys[0] if ys is not None else ggml.gemm(x, self.weight, self.ggml_type)
        return super().forward(x) if y is None else _finish(y, self)

    @staticmethod
    def forward_many(x: Tensor, linears: Sequence[KernelGGUFLinear]) -> list[Tensor] | None:
        """Several on the same x in one kernel call (types may differ), or None."""
        ys = ggml.linears(x, [m.weight for m in linears], [m.ggml_type for m in linears])
        return None if ys is None else [_finish(y, m) for y, m in zip(ys, linears, strict=True)]

    def fused(self, dtype: torch.dtype, may_pad: bool = False) -> FusedLinear | None:
        """No bias."""
        if self.bias is not None:
            return None
        return FusedLinear(WeightKind.GGML, 0, self.weight, ggml_type=self.ggml_type)


class KernelGGUFEmbedding(GGUFEmbedding):
    """The looked-up rows dequantized by torchchat's kernels."""

    def rows(self, ids: Tensor) -> Tensor:
        y = ggml.rows(self.weight, self.ggml_type, self.dim, ids)
        return super().rows(ids) if y is None else y


def _bf16_exactly(t: Tensor) -> Tensor | None:
    """t as bf16 if that changes no value (int4 scales, made in bf16, cast to an fp32 model's
    dtype with it), else None."""
    if t.dtype == torch.bfloat16:
        return t
    b = t.to(torch.bfloat16)
    return b if torch.equal(b.to(t.dtype), t) else None


def project(x: Tensor, linears: Sequence[nn.Module]) -> list[Tensor]:
    """Each of `linears` applied to x: in one kernel call when they are of one kind whose class
    can (`forward_many`: a layer's q, k, v or w1, w3 at decode, ~3 us saved a matrix), else one
    by one."""
    kind = type(linears[0])
    hooked = any(m._forward_pre_hooks or m._forward_hooks for m in linears)  # e.g. GPTQ's
    if hasattr(kind, "forward_many") and all(type(m) is kind for m in linears) and not hooked:
        ys = kind.forward_many(x, linears)
        if ys is not None:
            return ys
    return [m(x) for m in linears]


def _open_keys(k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """k, v (B, KV, T, D) and mask (.., T) cut after the last key any query may see. A prompt's
    rows attend over the whole cache otherwise (max_seq_length, 2048-4096 by default), the
    positions past it masked: TinyLlama's 64-token prefill spent 8.5 ms a layer in aten's SDPA
    over 2048 keys against 0.5 over 64 (its CPU kernel skips no masked block). The keys cut off
    weigh exactly 0 (exp(-inf))."""
    seen = mask.reshape(-1, mask.shape[-1]).any(0).nonzero()
    if seen.numel() == 0:
        return k, v, mask
    end = int(seen[-1]) + 1
    if end == k.shape[2]:
        return k, v, mask
    return k[:, :, :end], v[:, :, :end], mask[..., :end]


def attend_split(
    q: Tensor, prefix: tuple[Tensor, Tensor], own: tuple[Tensor, Tensor], split: PrefixSplit
) -> Tensor:
    """Attention of prompt chunks sharing a prefix (q (1, H, N, D)): every row over the
    prefix's keys and values (1, KV, S, D) unmasked, each chunk's rows over its own (M, KV, C,
    D) (batched, a chunk a batch row), the two merged by their log-sum-exps. Under one mask
    over all columns, every row met every chunk's own columns (aten's CPU kernel skips no
    masked block): 15 chunks of ~10 tokens after 912 shared positions, 1,242 columns a row for
    ~934 seen; the attention of such a step (stories110M, 2 threads) 62-66 ms against 85-98."""
    attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    (_, h, _, d), (m, r) = q.shape, split.rows.shape
    out, lse = attend(q, *prefix)[:2]
    by_row = q[0].transpose(0, 1)  # (N, H, D)
    qo = by_row.index_select(0, split.rows.view(-1)).view(m, r, h, d).transpose(1, 2)
    bias = torch.zeros(split.mask.shape, dtype=q.dtype).masked_fill_(~split.mask, -math.inf)
    mine, mine_lse = attend(qo, *own, attn_mask=bias)[:2]
    mine = mine.transpose(1, 2).reshape(m * r, h, d).index_select(0, split.take)
    mine_lse = mine_lse.transpose(1, 2).reshape(m * r, h).index_select(0, split.take)
    top = torch.maximum(lse, mine_lse.T[None])
    w = (lse - top).exp_()[..., None]
    mine_w = (mine_lse.T[None] - top).exp_()[..., None]
    y = (out.float() * w + mine.transpose(0, 1)[None].float() * mine_w) / (w + mine_w)
    return y.to(q.dtype)


class KernelAttention(Attention):
    """q, k, v in one kernel call; attention of a few query rows on torchchat's kernel, which
    reads only the span of the cache the mask leaves open."""

    def project(self, x: Tensor) -> list[Tensor]:
        return project(x, (self.wq, self.wk, self.wv))

    def rope(self, x: Tensor, freqs: Tensor) -> Tensor:
        y = kernels.rope(x, freqs)  # one op for ~12 aten ops
        return super().rope(x, freqs) if y is None else y

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, per_row: bool) -> Tensor:
        y = kernels.attention(q, k, v, mask)  # each row on its own: batch-invariant too
        if y is not None:
            return y
        if kernels.prefill_ok(q):  # eager, kernels on (off: exactly the plain model's math)
            k, v, mask = _open_keys(k, v, mask)
            rows = q.shape[0] * q.shape[2]
            if rows * k.shape[2] <= PREFILL_ATTENTION:
                y = kernels.attention(q, k, v, mask, most=rows)
                if y is not None:
                    return y
        return super().attend(q, k, v, mask, per_row)

    def attend_paged(self, q: Tensor, g: AttentionGroup, step: PagedStep) -> Tensor:
        # The pool read in place (no gathered copy: 8 sequences 930 positions in copied 46 MB
        # a layer per step) for decode groups and chunks of up to PAGED_QUERIES tokens.
        if g.queries <= PAGED_QUERIES:
            pool = self.paged
            y = kernels.attention_paged(q, pool.k, pool.v, g.read, g.mask)
            if y is not None:
                return y
        if g.split is not None and q.device.type == "cpu" and kernels.prefill_ok(q):
            split = g.split
            s, (m, c) = split.shared, split.cols.shape
            k, v = step.gather(s + m * c)
            prefix = self.paged.read(g.read[:, :s], (k, v))
            own = self.paged.read(g.read[0, split.cols], (k[s:], v[s:]))
            return attend_split(q, prefix, own, split)
        return super().attend_paged(q, g, step)


class KernelRMSNorm(RMSNorm):
    """RMSNorm in one op for eager CPU code (prefill: ~8 aten ops a norm otherwise)."""

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x) if y is None else y


class KernelFeedForward(FeedForward):
    """w1 and w3 in one kernel call; the gate in one op (aten's silu and mul otherwise)."""

    def project(self, x: Tensor) -> list[Tensor]:
        return project(x, (self.w1, self.w3))

    def gate(self, h1: Tensor, h3: Tensor) -> Tensor:
        y = kernels.silu_mul(h1, h3)
        return super().gate(h1, h3) if y is None else y


SWAPS: dict[type, type] = {
    nn.Linear: KernelLinear,
    Int8Linear: KernelInt8Linear,
    Int4Linear: KernelInt4Linear,
    GGUFLinear: KernelGGUFLinear,
    GGUFEmbedding: KernelGGUFEmbedding,
    Attention: KernelAttention,
    FeedForward: KernelFeedForward,
    RMSNorm: KernelRMSNorm,
}


def use_kernels(model: nn.Module) -> bool:
    """Give the model's modules their kernel-backed classes (in place, same tensors); True if
    the kernels run on this machine and the model is on the CPU, else the model is untouched."""
    if not kernels.simd_level() or any(t.device.type != "cpu" for t in model.parameters()):
        return False
    for m in model.modules():
        swap = SWAPS.get(type(m))  # exact classes only: a subclass computes something else
        if swap is not None:
            m.__class__ = swap
    return True


def _computes_as(m: nn.Module, cls: type) -> bool:
    """m is a cls whose forward is cls's own or its kernel-backed class's (which computes the
    same)."""
    return isinstance(m, cls) and (type(m).forward is cls.forward or type(m) is SWAPS.get(cls))


def decode_plan(model: Transformer) -> DecodePlan | None:
    """What the fused one-token step runs on for this model, or None where it does not apply:
    caches for one sequence on the CPU, plain Llama layers (no biases, no hooks) whose seven
    linears are all of one kind the step runs, and the kernels for that kind on this CPU."""
    dtype, device = model.norm.weight.dtype, model.norm.weight.device
    if model.max_batch != 1 or device.type != "cpu" or model.args.head_dim > 256:
        return None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    norms, linears, k_caches, v_caches = [], [], [], []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        blocks = (layer, a, f, layer.attention_norm, layer.ffn_norm, a.kv_cache)
        classes = (TransformerBlock, Attention, FeedForward, RMSNorm, RMSNorm, KVCache)
        if not all(map(_computes_as, blocks, classes)):
            return None
        layer_linears = (a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2)
        if any(m._forward_hooks or m._forward_pre_hooks for m in (*blocks, *layer_linears)):
            return None
        for n in (layer.attention_norm, layer.ffn_norm):
            if n.eps != model.args.norm_eps or n.weight.dtype != dtype:
                return None
            norms.append(n.weight)
        k_caches.append(a.kv_cache.k)
        v_caches.append(a.kv_cache.v)
        for m in layer_linears:
            fused = type(m).__dict__.get("fused")
            got = None if fused is None else fused(m, dtype, may_pad=m in (f.w1, f.w3))
            if got is None:
                return None
            linears.append(got)
    if len({f.key for f in linears}) != 1:
        return None
    if linears[0].kind in (WeightKind.INT4, WeightKind.INT4_INT8_ACTIVATIONS):
        # int4's blocked scales are copies made here, read every token as the weights are
        scales = huge_copies([f.scales for f in linears])
        linears = [replace(f, scales=s) for f, s in zip(linears, scales, strict=True)]
    plan = DecodePlan(norms, k_caches, v_caches, linears, model.args.norm_eps, model.args.n_heads)
    return plan if kernels.available(plan.needs()) else None
