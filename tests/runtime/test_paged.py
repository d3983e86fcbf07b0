"""The paged step (many sequences' keys/values in a pool of blocks) against the one-sequence path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support import random_args, random_state_dict
from torchchat import kernels
from torchchat.builder import build_transformer
from torchchat.model import transformer
from torchchat.model.transformer import PagedKVCache
from torchchat.runtime import kernel_modules
from torchchat.runtime.base import SeqChunk
from torchchat.runtime.eager import EagerRuntime, _packed_prompts, _prefix_split
from torchchat.runtime.kernel_modules import attend_split

ATOL = 1e-5  # fp32: rows of a paged step go through GEMMs of another M, so may round differently
BLOCK = 4


def runtime(seed: int = 2, fused: bool = True) -> EagerRuntime:
    args = random_args(n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = build_transformer(args, random_state_dict(args, seed=seed), torch.float32, "cpu")
    rt = EagerRuntime(model, 64, fused_decode=fused)
    assert rt.setup_paged(BLOCK, 80)
    rt.reserve_blocks(64)
    return rt


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(seq: list[int], feeds: list[int]) -> list[torch.Tensor]:
    """Logits at the end of each feed of `seq` (feeds: token counts) on the one-sequence path."""
    rt, out, pos = runtime(), [], 0
    for n in feeds:
        out.append(rt.forward(torch.tensor([seq[pos : pos + n]]), pos)[0, -1])
        pos += n
    return out


# Each sequence's blocks, deliberately out of order and interleaved with the others'.
TABLES = [[7, 2, 11, 5, 30, 31], [1, 9, 3, 12, 40, 41], [20, 4, 0, 6, 42, 43]]


def run_paged(rt: EagerRuntime, seqs: list[list[int]], feeds: list[list[int]], only=None):
    """Feed the sequences together (a step feeds each its next count, 0: sits the step out);
    per sequence the logits of each of its feeds."""
    pos = [0] * len(seqs)
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in range(max(map(len, feeds))):
        chunks, who = [], []
        for i, (seq, f) in enumerate(zip(seqs, feeds, strict=True)):
            if (only is None or i in only) and step < len(f) and f[step]:
                chunks.append(SeqChunk(i, seq[pos[i] : pos[i] + f[step]], pos[i], TABLES[i]))
                who.append(i)
                pos[i] += f[step]
        if chunks:
            for i, logits in zip(who, rt.step(chunks), strict=True):
                got[i].append(logits)
    return got


SEQS = [tokens(14, 1), tokens(9, 2), tokens(12, 3)]
# Prompt chunks (several tokens) and decodes (1) mixed in one step; a long prompt in chunks.
FEEDS = [[5, 1, 1, 4, 1, 1, 1], [3, 3, 1, 1, 1], [1, 1, 6, 1, 1, 1, 1]]


@torch.no_grad()
def test_paged_steps_match_the_one_sequence_path():
    got = run_paged(runtime(), SEQS, FEEDS)
    for seq, feeds, out in zip(SEQS, FEEDS, got, strict=True):
        for g, e in zip(out, reference(seq, feeds), strict=True):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_sequence_decodes_the_same_alone_and_among_others():
    """Greedy decoding from each prompt: the same tokens alone (the fused one-sequence step)
    and in a crowd (paged steps), and logits within float rounding."""

    def greedy(rt, prompts, steps=12):
        seqs = [list(p) for p in prompts]
        first = rt.step([SeqChunk(i, p, 0, TABLES[i]) for i, p in enumerate(seqs)])
        outs = [[int(row.argmax())] for row in first]
        logits = [[row] for row in first]
        for _ in range(steps):
            chunks = [
                SeqChunk(i, [o[-1]], len(p) + len(o) - 1, TABLES[i])
                for i, (p, o) in enumerate(zip(seqs, outs, strict=True))
            ]
            for o, lg, row in zip(outs, logits, rt.step(chunks), strict=True):
                o.append(int(row.argmax()))
                lg.append(row)
        return outs, logits

    prompts = [s[:5] for s in SEQS]
    together, crowd_logits = greedy(runtime(), prompts)
    for i, p in enumerate(prompts):
        alone, alone_logits = greedy(runtime(), [p])
        assert alone[0] == together[i]
        for a, b in zip(alone_logits[0], crowd_logits[i], strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@torch.no_grad()
def test_the_lone_sequence_runs_the_fused_step_and_keeps_its_blocks_current():
    """Alone, a sequence's one-token steps take the fused step on the static cache; each new
    position is also written to its block, so it can rejoin paged steps at any time."""
    rt = runtime()
    if not rt.fused_decode:
        return  # no fused step on this machine: every step is paged
    seq, table = tokens(20, 7), TABLES[0]
    rt.step([SeqChunk(0, seq[:8], 0, table)])
    calls = []
    fused = rt._fused_last
    rt._fused_last = lambda *a: calls.append(1) or fused(*a)
    solo = [rt.step([SeqChunk(0, [seq[p]], p, table)])[0] for p in range(8, 12)]
    assert len(calls) == 4
    # Rejoin a crowd: the paged step reads the positions the fused steps wrote to the blocks.
    crowd = rt.step([SeqChunk(0, [seq[12]], 12, table), SeqChunk(1, SEQS[1][:4], 0, TABLES[1])])
    expected = reference(seq, [8, 1, 1, 1, 1, 1])
    for g, e in zip([*solo, crowd[0]], expected[1:], strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_step_writes_only_its_own_positions():
    rt = runtime()
    run_paged(rt, SEQS, FEEDS, only={0, 2})
    pools = [
        (a.paged.k.clone(), a.paged.v.clone())
        for a in (layer.attention for layer in rt.model.layers)
    ]
    rt.step([SeqChunk(1, SEQS[1][:6], 0, TABLES[1])])  # positions 0..5: blocks 1 and 9
    changed_rows = set()
    for layer, (k0, v0) in zip(rt.model.layers, pools, strict=True):
        for old, new in ((k0, layer.attention.paged.k), (v0, layer.attention.paged.v)):
            changed_rows |= set((old != new).any(dim=2).any(dim=1).nonzero().view(-1).tolist())
    assert changed_rows == {4, 5, 6, 7, 36, 37}


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "copied"])
def test_the_pool_grows_keeping_its_contents(mapped, monkeypatch):
    """Grown as a view of its reserved mapping, or by copying where there is none (another
    device, or the OS refused it)."""
    if not mapped:
        monkeypatch.setattr(transformer, "reserve_zeros", lambda *a: None)
    rt = runtime()
    rt.step([SeqChunk(0, SEQS[0][:6], 0, TABLES[0])])
    before = rt.model.layers[0].attention.paged.k.clone()
    size = rt.kv_cache_bytes()
    rt.reserve_blocks(80)
    after = rt.model.layers[0].attention.paged.k
    assert after.shape[0] == 80 * BLOCK and torch.equal(after[: before.shape[0]], before)
    assert not after[before.shape[0] :].any()  # new blocks hold zeros
    assert rt.kv_cache_bytes() > size


@torch.no_grad()
def test_positions_copied_from_a_cached_block_give_what_computing_them_gives():
    """Copy-on-write at the first differing block: b shares a's first block, copies the first
    3 positions of a's second (the same tokens), and computes only the rest."""
    rt = runtime()
    common = tokens(7, 11)  # one block of 4 and 3 positions into the next
    a, b = [*common, 1, 2, 3], [*common, 50, 51, 52, 53]
    rt.step([SeqChunk(0, a, 0, [7, 2, 11])])
    rt.copy_blocks([(2, 30, 3)])  # a's second block -> b's own
    got = rt.step([SeqChunk(1, b[7:], 7, [7, 30, 31])])[0]
    torch.testing.assert_close(got, reference(b, [len(b)])[0], atol=ATOL, rtol=0)
    pool = rt.model.layers[0].attention.paged
    assert torch.equal(pool.k[30 * BLOCK : 30 * BLOCK + 3], pool.k[2 * BLOCK : 2 * BLOCK + 3])


@torch.no_grad()
def test_decode_steps_read_the_pool_in_place_without_a_gathered_copy():
    """Sequences decoding together attend on the pool itself (the kernels read each position's
    row through its index): no buffer for gathered copies is ever made for them."""
    rt = runtime()
    run_paged(rt, SEQS, [[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    in_place = kernels.takes_rows(torch.zeros(1, 8))  # torchchat's kernels run on this machine
    assert (rt._gather is None) == in_place
    rt.FUSED_ROWS = 8  # steps of more tokens on the modules:
    run_paged(rt, SEQS, [[3, 6], [9], [3]])  # a chunk of 9 tokens: copied for torch's attention
    assert rt._gather is not None


@torch.no_grad()
def test_prompt_chunks_sharing_a_prefix_attend_as_one_group(monkeypatch):
    """Chunks of sequences that share their first blocks (a system prompt) are one attention
    group over the union of their positions, the shared ones read once; each chunk still gets
    what computing its sequence alone gives."""
    rt = runtime()
    rt.FUSED_ROWS = 0  # the modules' step, where attention groups are made
    common = tokens(17, 12)  # four blocks of 4 and one position into the fifth
    rt.step([SeqChunk(0, common, 0, [7, 2, 11, 5, 30])])
    tails = [tokens(2, 20), tokens(3, 21), tokens(2, 22)]
    tables = [[7, 2, 11, 5, 40 + i] for i in range(3)]
    rt.copy_blocks([(30, t[4], 1) for t in tables])
    chunks = [
        SeqChunk(1 + i, tail, 17, t) for i, (tail, t) in enumerate(zip(tails, tables, strict=True))
    ]
    _, layout = rt._layout(chunks)
    # one group of all 7 query rows over 16 shared positions and each sequence's 3-4 own
    assert [(g.batch, g.queries, g.read.shape[1]) for g in layout.groups] == [(1, 7, 26)]
    split = layout.groups[0].split  # attended as the prefix, then each chunk's own columns
    assert split.shared == 16  # own columns of each (padded with its first): 3, 4, 3
    assert split.cols.tolist() == [[16, 17, 18, 16], [19, 20, 21, 22], [23, 24, 25, 23]]
    calls = []
    monkeypatch.setattr(
        kernel_modules, "attend_split", lambda *a: calls.append(1) or attend_split(*a)
    )
    got = rt.step(chunks)
    assert len(calls) == len(rt.model.layers)
    for tail, g in zip(tails, got, strict=True):
        expected = reference(common + tail, [len(common) + len(tail)])[0]
        torch.testing.assert_close(g, expected, atol=ATOL, rtol=0)


def test_prompt_chunks_are_packed_only_where_it_reads_less_and_wastes_little():
    def groups(chunks):
        return _packed_prompts(chunks, BLOCK)

    # nothing shared (different first blocks, or a chunk from position 0): apart
    assert groups([SeqChunk(0, [1] * 3, 8, [1, 2, 3]), SeqChunk(1, [1] * 3, 8, [4, 5, 6])]) == [
        [0],
        [1],
    ]
    assert groups([SeqChunk(0, [1] * 3, 0, [1]), SeqChunk(1, [1] * 3, 0, [1])]) == [[0], [1]]
    # a long shared prefix and short own parts: one group (decoding chunks are not prompts)
    shared = [1, 2, 3, 4]
    packed = [SeqChunk(i, [1] * 2, 16, [*shared, 10 + i]) for i in range(3)]
    assert groups([SeqChunk(9, [1], 5, [7, 8]), *packed]) == [[1, 2, 3]]
    # one shared block and long own parts: each row would meet far more masked positions
    # (the other chunks') than it attends, so apart
    long = [SeqChunk(i, [1] * 12, 4, [1, 10 + 4 * i, 11 + 4 * i, 12 + 4 * i]) for i in range(3)]
    assert groups(long) == [[0], [1], [2]]


def test_the_pool_is_reserved_address_space_that_grows_without_copying():
    """On the CPU the pool's most blocks are reserved at once and take memory only where
    written: 4 GiB of pool adds no resident memory, and growing keeps the same storage."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("no /proc/self/statm to read resident memory from (not Linux)")

    def resident() -> int:
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident()
    pool = PagedKVCache(16, 8, 128, 2**16, torch.float32, "cpu")  # 2 x 2 GiB
    pool.grow(2)
    k = pool.k.data_ptr()
    pool.write(torch.tensor([0, 31]), torch.ones(2, 8, 128), torch.ones(2, 8, 128))
    pool.grow(2**16)
    assert pool.k.data_ptr() == k and pool.k.shape == (2**20, 8, 128)
    assert torch.equal(pool.k[31], torch.ones(8, 128)) and not pool.k[32:64].any()
    assert resident() - before < 64 * 2**20
    with pytest.raises(ValueError, match="at most 65536 blocks"):
        pool.grow(2**16 + 1)


def test_a_pool_cast_after_setup_grows_by_copying_keeping_its_contents():
    """Moved or cast, the pool's tensors are no longer its reserved mapping: growing then
    copies them (a view of the mapping would drop what they hold)."""
    pool = PagedKVCache(4, 2, 8, 16, torch.float32, "cpu")
    pool.grow(2)
    pool.write(torch.tensor([5]), torch.ones(1, 2, 8), torch.ones(1, 2, 8))
    pool.to(torch.float64)
    pool.grow(4)
    assert pool.k.dtype == torch.float64 and pool.k.shape == (16, 2, 8)
    assert torch.equal(pool.k[5], torch.ones(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_split_group_attends_as_the_whole_group_under_its_mask(dtype):
    """attend_split (the shared prefix unmasked, each chunk's own columns batched, merged by
    log-sum-exp) against aten's attention over all the group's columns under its mask: chunks
    of 1, 3 and 5 rows, 6 shared positions, own columns of 2, 7 and 5, 8 query heads on 2."""
    g = torch.Generator().manual_seed(0)
    chunks = [
        SeqChunk(i, [1] * n, start, []) for i, (n, start) in enumerate([(1, 7), (3, 10), (5, 6)])
    ]
    shared, own = 6, [2, 7, 5]  # own: positions shared..end of each
    n, t = sum(len(c.tokens) for c in chunks), shared + sum(own)
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[:, :shared] = True
    row, col = 0, shared
    for c, o in zip(chunks, own, strict=True):
        for r in range(len(c.tokens)):  # row r sees positions shared..start + r
            mask[row + r, col : col + c.start + r + 1 - shared] = True
        row, col = row + len(c.tokens), col + o
    split = _prefix_split(chunks, own, mask, shared)
    q = torch.randn(1, 8, n, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, t, 16, generator=g).to(dtype) for _ in "kv")
    cols = split.cols.reshape(-1)
    mine = [x[0][:, cols].view(2, *split.cols.shape, 16).transpose(0, 1) for x in (k, v)]
    got = attend_split(q, (k[:, :, :shared], v[:, :, :shared]), mine, split)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: inputs and each part's output rounded
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)
