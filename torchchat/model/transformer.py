"""The Llama-family Transformer: RMSNorm, RoPE (with Llama 3.1 scaling), GQA, SwiGLU, static KV cache.

The cache has `max_batch` rows ("slots"). A forward either feeds rows slot.. at shared positions
(S,) -- one sequence, the common case -- or feeds each row at its own positions (B, S), which
lets one decode step serve many independent sequences at once (the server's batching).

Weights use Meta's layout and names (`layers.N.attention.wq.weight`, ...): query/key rows are in
interleaved-pair RoPE order, as in Meta's and llama2.c's checkpoints and GGUF files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchchat import kernels
from torchchat.model.config import ModelArgs, RopeScaling


def rope_frequencies(args: ModelArgs, seq_len: int) -> Tensor:
    """(seq_len, head_dim // 2, 2) table of cos/sin for each position and frequency, fp32."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    if args.rope_scaling is not None:
        inv_freq = _scale_frequencies(inv_freq, args.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def _scale_frequencies(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs of x (B, S, H, D) by freqs (S, D//2, 2) or, per row, (B, S, D//2, 2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.unsqueeze(-3)  # broadcast over heads
    out = torch.stack(
        [
            xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
            xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class Linear(nn.Linear):
    """nn.Linear that runs torchchat's own CPU kernels for the few-token case when they apply
    (see torchchat.kernels), torch's F.linear otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.float_linear(x, self.weight)
        if y is not None:
            return y if self.bias is None else y + self.bias
        y = kernels.fp32_gemm(x, self.weight, self.bias)  # fp32 prefill on CPU
        return F.linear(x, self.weight, self.bias) if y is None else y

    def fused_weights(self, dtype: torch.dtype, may_pad: bool = False):
        """(kind, weight, scales) for `kernels.decode_layers`, or None: float weights of the
        activation dtype, no bias."""
        if self.bias is not None or self.weight.dtype != dtype:
            return None
        if type(self.weight) not in (Tensor, nn.Parameter):  # e.g. torchao's quantized tensors
            return None
        return (kernels.FLOAT_WEIGHTS, 0, None), self.weight, None

    @staticmethod
    def forward_many(x: Tensor, linears: Sequence[Linear]) -> list[Tensor] | None:
        """Several Linears of one width on the same x in one kernel call, or None."""
        ys = kernels.float_linears(x, [m.weight for m in linears])
        if ys is None:
            return None
        return [y if m.bias is None else y + m.bias for y, m in zip(ys, linears, strict=True)]


def project(x: Tensor, linears: Sequence[nn.Module]) -> list[Tensor]:
    """Each of `linears` applied to x: in one kernel call when they are of one kind whose class
    can (`forward_many`: a layer's q, k, v or w1, w3 at decode on torchchat's CPU kernels, ~3 us
    saved a matrix), else one by one."""
    kind = type(linears[0])
    hooked = any(m._forward_pre_hooks or m._forward_hooks for m in linears)  # e.g. GPTQ's
    if hasattr(kind, "forward_many") and all(type(m) is kind for m in linears) and not hooked:
        ys = kind.forward_many(x, linears)
        if ys is not None:
            return ys
    return [m(x) for m in linears]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


class KVCache(nn.Module):
    """Static per-layer key/value cache: (slots, kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch: int, seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: Tensor, k: Tensor, v: Tensor, slot: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, S, D) into rows slot..slot+B at positions input_pos, (S,) shared or
        (B, S) per row; return those rows of the cache (every position)."""
        b = k.shape[0]
        kc, vc = self.k, self.v
        if slot != 0 or b != kc.shape[0]:  # a view only when needed: no copy in compiled graphs
            kc, vc = kc[slot : slot + b], vc[slot : slot + b]
        if input_pos.dim() == 1:
            kc.index_copy_(2, input_pos, k)
            vc.index_copy_(2, input_pos, v)
        else:  # index_put_, which torch.compile updates in place (scatter_ it copies)
            rows = torch.arange(b, device=k.device)[:, None]
            kc[rows, :, input_pos] = k.transpose(1, 2)
            vc[rows, :, input_pos] = v.transpose(1, 2)
        return kc, vc


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        freqs: Tensor,
        mask: Tensor,
        input_pos: Tensor,
        slot: int = 0,
        span: int | None = None,
    ) -> Tensor:
        b, s, _ = x.shape
        q, k, v = project(x, (self.wq, self.wk, self.wv))
        q = apply_rope(q.view(b, s, self.n_heads, self.head_dim), freqs)
        k = apply_rope(k.view(b, s, self.n_kv_heads, self.head_dim), freqs)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v, slot)
        if span is not None:
            k, v = k[:, :, :span], v[:, :, :span]
        y = kernels.attention(q, k, v, mask)  # torchchat's CPU kernel for a few query rows
        if y is None and input_pos.dim() == 1:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
            )
        elif y is None:
            y = attend_rows(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


def attend_rows(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of q (B, H, S, D) over k, v (B, KV, T, D) under mask (B, 1, S, T), with plain
    matmuls: a row's result does not depend on its index in the batch. (The fused CPU kernel
    splits batch x heads over threads, and rows computed on different threads round differently.)"""
    b, h, s, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    g = h // kv  # query heads sharing each key/value head
    scores = (q.reshape(b, kv, g * s, d) @ k.transpose(-1, -2)).view(b, kv, g, s, t)
    scores = scores.float().masked_fill(~mask[:, :, None], float("-inf")) * d**-0.5
    probs = torch.softmax(scores, dim=-1).type_as(q).view(b, kv, g * s, t)
    return (probs @ v).view(b, h, s, d)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h1, h3 = project(x, (self.w1, self.w3))
        return self.w2(F.silu(h1) * h3)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: Tensor,
        freqs: Tensor,
        mask: Tensor,
        input_pos: Tensor,
        slot: int = 0,
        span: int | None = None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos, slot, span)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama-family decoder. Call `setup_caches` before `forward`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = self.max_seq_len = 0
        self._fuse = False
        self._decode_plan: DecodePlan | None = None
        # the plan holds references to weights and a copy of int4 scales: renew it when they change
        self.register_load_state_dict_post_hook(lambda module, _: module._renew_plan())

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: new buffers, other dtypes
        out = super()._apply(fn, recurse)
        self._renew_plan()
        return out

    def _renew_plan(self) -> None:
        if self._fuse and self.max_batch:
            self._decode_plan = decode_plan(self)

    def fuse_decode(self, on: bool = True) -> bool:
        """Run one-token steps of one sequence (cache slot 0, eager, no grad) through torchchat's
        `decode_layers` kernel: all layers in one call instead of ~10 ops and kernels a layer
        (on stories110M int4, 2 threads: 1.6 ms a token against 3.6-4.5 for the modules, 1.6-2.1
        for their compiled graph). True if it applies: CPU kernels, caches for one sequence, plain Llama layers
        whose seven linears are all of one kind it runs (float weights of the activation dtype,
        int8, int4, 8da4w), no biases, no hooks. Call it once the model is quantized; each
        `setup_caches`, `.to()` and `load_state_dict` renews it (caches for several sequences
        turn it off until then); after writing weights in place, call it again (it keeps a copy
        of int4 scales)."""
        self._fuse = on
        self._decode_plan = decode_plan(self) if on else None
        return self._decode_plan is not None

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        """Allocate KV caches (max_batch slots), the RoPE table and the causal mask for up to
        max_seq_len positions."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's context {self.args.max_seq_len}"
            )
        # Norm weights stay in the activation dtype even when linears are quantized.
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(max_batch, max_seq_len, a.n_kv_heads, a.head_dim, dtype, device)
        self.register_buffer(
            "freqs", rope_frequencies(self.args, max_seq_len).to(device), persistent=False
        )
        causal = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self._renew_plan()

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor,
        slot: int = 0,
        span: int | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """tokens (B, S) in cache rows slot..slot+B at positions input_pos -> fp32 logits
        (B, S, vocab). input_pos is (S,), the same for every row, or (B, S), one per row; a row
        sees the cache positions at or before its own (its causal mask and RoPE are its own).
        `span` limits attention to cache positions [0, span): less to read when every position
        that matters is below it (rows at positions >= span get meaningless logits).
        `last_only`: logits of the last position only, (B, 1, vocab) -- a prompt's prefill
        needs no others, and the output layer is a large share of its work."""
        x = self._fused_step(tokens, input_pos, slot, span)
        if x is not None:  # one token of one sequence through torchchat's fused step
            return self.output(self.norm(x)).float()
        if input_pos.dim() == 1:
            mask = self.causal_mask[None, None, input_pos]
        else:
            mask = self.causal_mask[input_pos].unsqueeze(1)  # (B, 1, S, max_seq_len)
        if span is not None:
            mask = mask[..., :span]
        freqs = self.freqs[input_pos]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos, slot, span)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def _fused_step(
        self, tokens: Tensor, input_pos: Tensor, slot: int, span: int | None
    ) -> Tensor | None:
        """The layers' output for one token of the sequence in slot 0 by `kernels.decode_layers`,
        or None where that does not run (not fused, compiling, grad mode: it has no backward)."""
        p = self._decode_plan
        if torch.compiler.is_compiling() or p is None or torch.is_grad_enabled():
            return None
        if tokens.shape != (1, 1) or input_pos.shape != (1,) or slot != 0 or span is not None:
            return None
        if input_pos.dtype != torch.long or self.freqs.dtype != torch.float32:
            return None
        return kernels.decode_layers(
            self.tok_embeddings(tokens), p.norms, self.args.norm_eps, self.freqs,
            self.causal_mask, input_pos, p.k_caches, p.v_caches, p.weights, p.scales, p.kind,
            p.groupsize, self.args.n_heads,
        )  # fmt: skip


@dataclass
class DecodePlan:
    """The tensors `kernels.decode_layers` takes for a model, gathered once."""

    norms: list[Tensor]
    k_caches: list[Tensor]
    v_caches: list[Tensor]
    weights: list[Tensor]
    scales: list[Tensor]
    kind: int
    groupsize: int


def decode_plan(model: Transformer) -> DecodePlan | None:
    """What `Transformer.fuse_decode` runs on, or None where the fused step does not apply."""
    dtype, device = model.norm.weight.dtype, model.norm.weight.device
    if model.max_batch != 1 or device.type != "cpu" or model.args.head_dim > 256:
        return None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    norms, weights, scales, kinds = [], [], [], set()
    k_caches, v_caches = [], []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        blocks = (layer, a, f, layer.attention_norm, layer.ffn_norm, a.kv_cache)
        if tuple(map(type, blocks)) != (
            TransformerBlock, Attention, FeedForward, RMSNorm, RMSNorm, KVCache,
        ):  # fmt: skip
            return None
        linears = (a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2)
        if any(m._forward_hooks or m._forward_pre_hooks for m in (*blocks, *linears)):
            return None
        for n in (layer.attention_norm, layer.ffn_norm):
            if n.eps != model.args.norm_eps or n.weight.dtype != dtype:
                return None
            norms.append(n.weight)
        k_caches.append(a.kv_cache.k)
        v_caches.append(a.kv_cache.v)
        for m in linears:
            # each kind the step runs says so itself (defined on its own class: a subclass
            # may compute something else)
            fused = type(m).__dict__.get("fused_weights")
            got = None if fused is None else fused(m, dtype, may_pad=m in (f.w1, f.w3))
            if got is None:
                return None
            key, weight, scale = got
            kinds.add(key)
            weights.append(weight)
            if scale is not None:
                scales.append(scale)
    if len(kinds) != 1:
        return None
    kind, groupsize, _ = kinds.pop()
    need = kernels.AVX512_BF16 if kind >= kernels.INT4_WEIGHTS else kernels.AVX512
    if not kernels.available(need):
        return None
    return DecodePlan(norms, k_caches, v_caches, weights, scales, kind, groupsize)
