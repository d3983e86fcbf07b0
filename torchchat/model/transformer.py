"""The Llama-family Transformer: RMSNorm, RoPE (with Llama 3.1 scaling), GQA, SwiGLU, static KV cache.

The static cache has `max_batch` rows; a forward feeds every row at the same positions (S,) --
one sequence, the common case.

Many sequences at once (the server's batching) go through `forward_paged` instead: their keys
and values live in a pool of fixed-size blocks (`PagedKVCache`), and one call feeds each
sequence its own new tokens -- one to decode, or a chunk of a prompt -- as rows of one batch.

Weights use Meta's layout and names (`layers.N.attention.wq.weight`, ...): query/key rows are in
interleaved-pair RoPE order, as in Meta's and llama2.c's checkpoints and GGUF files.

Plain PyTorch, one data path: faster modules (torchchat's CPU kernels, the fused one-token step)
are swapped in by the runtime that runs the model (torchchat/runtime/kernel_modules.py), and
quantization swaps the linears; export takes the model as it is here.
"""

from __future__ import annotations

import math
import mmap
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    """Static per-layer key/value cache: (batch, kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch: int, seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, S, D) into rows 0..B-1 at positions input_pos (S,); return those
        rows of the cache (every position)."""
        kc, vc = self.k, self.v
        if k.shape[0] != kc.shape[0]:  # a view only when needed: no copy in compiled graphs
            kc, vc = kc[: k.shape[0]], vc[: k.shape[0]]
        kc.index_copy_(2, input_pos, k)
        vc.index_copy_(2, input_pos, v)
        return kc, vc


class PagedKVCache(nn.Module):
    """Per-layer keys/values of many sequences in blocks of `block_size` positions:
    (blocks x block_size, kv_heads, head_dim), a position's heads together so that gathering a
    sequence's positions copies whole rows. Which rows hold which sequence's positions is the
    caller's business (a block table per sequence); this only writes and gathers rows.

    On the CPU the pool of at most `max_blocks` blocks is address space reserved at once (an
    anonymous mapping: zero pages, memory taken only where positions are written), so growing
    it is a view of more rows: no copy, no old and new pool held at once. (Grown by copying, a
    pool of 81 blocks of stories110M going to 121 cost 50-90 ms a burst of new requests waited
    for, and peaked at both pools' memory.) Elsewhere, or where the OS refuses the mapping, it
    grows by copying."""

    def __init__(
        self, block_size: int, n_kv_heads: int, head_dim: int, max_blocks: int, dtype, device
    ):
        super().__init__()
        self.block_size, self.max_blocks = block_size, max_blocks
        shape = (max_blocks * block_size, n_kv_heads, head_dim)
        self._reserved = [reserve_zeros(shape, dtype, device) for _ in "kv"]
        empty = torch.zeros((0, n_kv_heads, head_dim), dtype=dtype, device=device)
        self.register_buffer("k", empty, persistent=False)
        self.register_buffer("v", empty.clone(), persistent=False)

    @property
    def blocks(self) -> int:
        return self.k.shape[0] // self.block_size

    def grow(self, blocks: int) -> None:
        """Hold `blocks` blocks (at most max_blocks), keeping what the current ones hold."""
        if blocks > self.max_blocks:
            raise ValueError(f"a pool of at most {self.max_blocks} blocks cannot hold {blocks}")
        rows = blocks * self.block_size
        if rows <= self.k.shape[0]:
            return
        if self._holds_reserved():
            self.k, self.v = self._reserved[0][:rows], self._reserved[1][:rows]
        else:
            pad = (0, 0, 0, 0, 0, rows - self.k.shape[0])
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)

    def _holds_reserved(self) -> bool:
        """Whether the pool is (still) its reserved mapping: not where there is none, nor after
        the module was moved or cast (its k and v then are other tensors)."""
        r = self._reserved[0]
        if r is None or self.k.dtype != r.dtype or self.k.device != r.device:
            return False
        return self.k.numel() == 0 or self.k.data_ptr() == r.data_ptr()

    def write(self, rows: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v (N, kv_heads, D) at pool rows (N,)."""
        self.k.index_copy_(0, rows, k)
        self.v.index_copy_(0, rows, v)

    def copy(self, src: Tensor, dst: Tensor) -> None:
        """Pool rows src (N,) into rows dst (N,)."""
        for pool in (self.k, self.v):
            rows = pool.view(pool.shape[0], -1)
            rows.index_copy_(0, dst, rows.index_select(0, src))

    def read(self, rows: Tensor, into: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Keys and values at pool rows (B, T), as (B, kv_heads, T, D) views of their copies in
        `into` (two (>= B x T, kv_heads x D) buffers, overwritten; each row of D contiguous,
        positions kv_heads x D apart)."""
        b, t = rows.shape
        flat, shape = rows.reshape(-1), (b, t, *self.k.shape[1:])
        out = []
        for pool, buf in ((self.k, into[0]), (self.v, into[1])):
            # Into a buffer kept across calls: a fresh one per call paid its page faults each
            # time (7x the copy); rows of 2-d: one copy each (3.5x faster than of 3-d ones).
            dst = buf[: b * t]
            torch.index_select(pool.view(pool.shape[0], -1), 0, flat, out=dst)
            out.append(dst.view(shape).transpose(1, 2))
        return out[0], out[1]


def reserve_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor | None:
    """A zero tensor of `shape` on the CPU whose memory is taken only as it is written (an
    anonymous private mapping, not reserved against swap), or None: another device, an OS
    without such mappings (Windows), or the OS refused this one."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    try:
        buf = mmap.mmap(-1, nbytes, flags=flags)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


# Linux's MAP_NORESERVE (Python's mmap does not name it): address space a pool may never fill
# is not counted against the machine's memory under the default overcommit policy.
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0


@dataclass
class AttentionGroup:
    """`batch` sequences of `queries` new tokens each, taking rows start.. of a paged step (one
    sequence after the other), attending to pool rows `read` (batch, T) under `mask`
    (batch, 1, queries, T). `per_row`: computed so a row's result does not depend on the group."""

    start: int
    batch: int
    queries: int
    read: Tensor
    mask: Tensor
    per_row: bool
    split: PrefixSplit | None = None


@dataclass
class PrefixSplit:
    """A group of prompt chunks (batch 1) whose query rows all see its first `shared` key
    columns (a prefix their sequences have in common), each of M chunks then its own columns:
    `rows` (M, R) and `cols` (M, C), the query rows and key columns of each (padded), `mask`
    (M, 1, R, C) bool which of those a row sees, `take` (queries,) each query row's place in
    M x R. The group's `mask` says the same over all columns."""

    shared: int
    rows: Tensor
    cols: Tensor
    mask: Tensor
    take: Tensor

    def to(self, device) -> PrefixSplit:
        move = [t.to(device) for t in (self.rows, self.cols, self.mask, self.take)]
        return PrefixSplit(self.shared, *move)


@dataclass
class PagedStep:
    """The layout of one paged forward over N new tokens: their positions (N,) and pool rows
    (N,), the attention groups covering rows 0..N-1 in order, the rows whose logits are
    wanted (`last`), and `gather(rows)`: two buffers of at least `rows` rows (kv_heads x
    head_dim) that a group attended on a gathered copy has its keys and values copied into
    (kept by the runtime, overwritten group after group; asked for only by groups that copy)."""

    positions: Tensor
    write: Tensor
    groups: list[AttentionGroup]
    last: Tensor
    gather: Callable[[int], tuple[Tensor, Tensor]]


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
        self.paged: PagedKVCache | None = None

    def forward(
        self,
        x: Tensor,
        freqs: Tensor,
        mask: Tensor,
        input_pos: Tensor,
    ) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q = self.rope(q.view(b, s, self.n_heads, self.head_dim), freqs)
        k = self.rope(k.view(b, s, self.n_kv_heads, self.head_dim), freqs)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v)
        y = self.attend(q, k, v, mask, per_row=False)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))

    def forward_paged(self, x: Tensor, freqs: Tensor, step: PagedStep) -> Tensor:
        """x (1, N, dim) of a paged step (see `PagedStep`); freqs (N, D/2, 2)."""
        n = x.shape[1]
        q, k, v = self.project(x)
        q = self.rope(q.view(1, n, self.n_heads, self.head_dim), freqs)
        k = self.rope(k.view(1, n, self.n_kv_heads, self.head_dim), freqs)
        self.paged.write(step.write, k[0], v.view(n, self.n_kv_heads, self.head_dim))
        out = []
        for g in step.groups:
            rows = q[0, g.start : g.start + g.batch * g.queries]
            qg = rows.view(g.batch, g.queries, self.n_heads, self.head_dim).transpose(1, 2)
            y = self.attend_paged(qg, g, step)
            out.append(y.transpose(1, 2).reshape(g.batch * g.queries, -1))
        return self.wo(torch.cat(out)[None])

    def attend_paged(self, q: Tensor, g: AttentionGroup, step: PagedStep) -> Tensor:
        """Attention of group g's queries q (batch, H, queries, D) over its pool rows: here on
        a gathered copy of them."""
        k, v = self.paged.read(g.read, step.gather(g.read.numel()))
        return self.attend(q, k, v, g.mask, per_row=g.per_row)

    def project(self, x: Tensor) -> list[Tensor]:
        """q, k and v of x."""
        return [self.wq(x), self.wk(x), self.wv(x)]

    def rope(self, x: Tensor, freqs: Tensor) -> Tensor:
        """x (B, S, heads, head_dim) rotated by freqs (apply_rope)."""
        return apply_rope(x, freqs)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, per_row: bool) -> Tensor:
        """softmax(q k^T / sqrt(D), where mask) v; `per_row`: each batch row a sequence of its
        own, computed so that a row's result does not depend on the batch it is in."""
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
        return self.w2(self.gate(h1, h3))

    def gate(self, h1: Tensor, h3: Tensor) -> Tensor:
        """silu(h1) * h3."""
        return F.silu(h1) * h3

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
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_paged(self, x: Tensor, freqs: Tensor, step: PagedStep) -> Tensor:
        h = x + self.attention.forward_paged(self.attention_norm(x), freqs, step)
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
        """Allocate KV caches (max_batch rows), the RoPE table and the causal mask for up to
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

    def setup_paged(self, block_size: int, max_blocks: int) -> None:
        """Give every layer an empty paged KV cache of `block_size`-position blocks, at most
        `max_blocks` (grown by `grow_paged`). The one-sequence cache stays as it is."""
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        for layer in self.layers:
            a = layer.attention
            kv = (a.n_kv_heads, a.head_dim)
            a.paged = PagedKVCache(block_size, *kv, max_blocks, dtype, device)

    def grow_paged(self, blocks: int) -> None:
        """Make every layer's paged cache hold `blocks` blocks."""
        for layer in self.layers:
            layer.attention.paged.grow(blocks)

    def forward_paged(self, tokens: Tensor, step: PagedStep) -> Tensor:
        """tokens (1, N) of many sequences laid out by `step` -> fp32 logits (len(step.last),
        vocab) of the rows step.last."""
        freqs = self.freqs[step.positions]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer.forward_paged(x, freqs, step)
        return self.output(self.norm(x[:, step.last])).float()[0]

    def copy_blocks(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Every layer's paged cache: for each (src, dst, n), block src's first n positions
        into block dst. All of a step's copies in one copy a pool (14 chats sharing a system
        prompt, each block copied on write: 2.2 ms against 5.2 ms a block at a time)."""
        if not copies:
            return
        bs, dev = self.layers[0].attention.paged.block_size, self.norm.weight.device
        src = torch.cat([torch.arange(s * bs, s * bs + n) for s, _, n in copies]).to(dev)
        dst = torch.cat([torch.arange(d * bs, d * bs + n) for _, d, n in copies]).to(dev)
        for layer in self.layers:
            layer.attention.paged.copy(src, dst)

    def rows_from_paged(self, rows: Tensor) -> None:
        """The static cache's row 0 at positions 0..len(rows)-1 from the paged pool's `rows`: a
        paged sequence run on the one-sequence path."""
        n = rows.numel()
        for layer in self.layers:
            row, pool = layer.attention.kv_cache, layer.attention.paged
            for r, p in ((row.k, pool.k), (row.v, pool.v)):
                r[0, :, :n] = p.index_select(0, rows).transpose(0, 1)

    def position_to_paged(self, pos: int, row: int) -> None:
        """Position `pos` of the static cache's row 0 into the paged pool's row `row` (a paged
        sequence's new position on the one-sequence path, written back). Plain views copied:
        an index_put a layer cost ~1.2 ms a token in the server (5% of a stories110M token)."""
        for layer in self.layers:
            cache, pool = layer.attention.kv_cache, layer.attention.paged
            pool.k[row].copy_(cache.k[0, :, pos])
            pool.v[row].copy_(cache.v[0, :, pos])

    def forward(self, tokens: Tensor, input_pos: Tensor, last_only: bool = False) -> Tensor:
        """tokens (B, S) in cache rows 0..B-1 at positions input_pos (S,) -> fp32 logits
        (B, S, vocab). `last_only`: logits of the last position only, (B, 1, vocab) -- a
        prompt's prefill needs no others, and the output layer is a large share of its work."""
        mask = self.causal_mask[None, None, input_pos]
        freqs = self.freqs[input_pos]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()
