"""The Llama-family Transformer: RMSNorm, RoPE (with Llama 3.1 scaling), GQA, SwiGLU, static KV cache.

The cache has `max_batch` rows ("slots"). A forward either feeds rows slot.. at shared positions
(S,) -- one sequence, the common case -- or feeds each row at its own positions (B, S), which
lets one decode step serve many independent sequences at once (the server's batching).

Weights use Meta's layout and names (`layers.N.attention.wq.weight`, ...): query/key rows are in
interleaved-pair RoPE order, as in Meta's and llama2.c's checkpoints and GGUF files.

Plain PyTorch, one data path: faster modules (torchchat's CPU kernels, the fused one-token step)
are swapped in by the runtime that runs the model (torchchat/runtime/kernel_modules.py), and
quantization swaps the linears; export takes the model as it is here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=bias)
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
        q, k, v = self.project(x)
        q = apply_rope(q.view(b, s, self.n_heads, self.head_dim), freqs)
        k = apply_rope(k.view(b, s, self.n_kv_heads, self.head_dim), freqs)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v, slot)
        if span is not None:
            k, v = k[:, :, :span], v[:, :, :span]
        y = self.attend(q, k, v, mask, per_row=input_pos.dim() > 1)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))

    def project(self, x: Tensor) -> list[Tensor]:
        """q, k and v of x."""
        return [self.wq(x), self.wk(x), self.wv(x)]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, per_row: bool) -> Tensor:
        """softmax(q k^T / sqrt(D), where mask) v; `per_row`: each batch row at its own
        positions, computed so that a row's result does not depend on the batch it is in."""
        if per_row:
            return attend_rows(q, k, v, mask)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )


def attend_rows(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of q (B, H, S, D) over k, v (B, KV, T, D) under mask (B, 1, S, T), with plain
    matmuls: a row's result does not depend on its index in the batch. (aten's
    scaled_dot_product_attention splits batch x heads over threads, and rows computed on
    different threads round differently.)"""
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
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h1, h3 = self.project(x)
        return self.w2(F.silu(h1) * h3)

    def project(self, x: Tensor) -> list[Tensor]:
        """The gate (w1) and up (w3) projections of x."""
        return [self.w1(x), self.w3(x)]


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
        # nn.Embedding's own N(0, 1) init, except on the meta device (where models are built to
        # load weights into): there it sets nothing and costs ~1 s and ~70 MB (torch._refs'
        # normal_ imports torch._dynamo).
        table = torch.empty(args.vocab_size, args.dim)
        if table.device.type != "meta":
            nn.init.normal_(table)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=table)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = self.max_seq_len = 0

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
