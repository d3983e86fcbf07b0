"""Runs a `Transformer` in PyTorch, eagerly or through torch.compile."""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import Tensor

from torchchat import kernels
from torchchat.errors import TorchchatError
from torchchat.kernels import fused
from torchchat.model.transformer import AttentionGroup, PagedStep, PrefixSplit, Transformer
from torchchat.pages import place_in_huge_pages
from torchchat.quant.linear import prepare_aten_int4
from torchchat.runtime.base import ModelRuntime, SeqChunk
from torchchat.runtime.kernel_modules import decode_plan, use_kernels


def _guards_to_keep(entries) -> list[bool]:
    """Dynamo checks guards before every call of a compiled function; on a model's hundreds of
    modules, weights and aliasing pairs that took 0.4-0.5 ms of each decode step (stories110M).
    Keep the guards outside the modules (inputs, globals, grad mode) and those on the KV caches,
    which `setup_caches` may reallocate with other shapes; drop the ones on module attributes,
    weights and weight aliasing, none of which change once a runtime is built."""
    return [
        e.guard_type != "DUPLICATE_INPUT"
        and (not e.orig_guard.source.is_unspecialized_nn_module() or "kv_cache" in e.name)
        for e in entries
    ]


# Decode graphs (one static shape each), measured on stories110M int4, 2 threads: the C++
# wrapper calls the graph's ~200 kernels without Python in between (-0.5 ms a token; the first
# compile takes ~25 s longer, cached runs do not) and the guard filter saves another 0.5-0.9 ms.
DECODE_OPTIONS = {"cpp_wrapper": True, "guard_filter_fn": _guards_to_keep}


def _own_code(method):
    """`method` with a code object of its own. Dynamo keeps compiled graphs on the code object
    they came from, and `_guards_to_keep` drops the guards that tell one model from another:
    two runtimes compiling the same method would otherwise share graphs (a draft model ran its
    target's graph, or failed looking for weights it does not have)."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__)
    return types.MethodType(own, method.__self__)


class EagerRuntime(ModelRuntime):
    """An nn.Module Transformer with caches set up, run on torchchat's CPU kernels where they
    apply. Decode steps of one sequence run the fused one-token step, or the modules eagerly, or
    their compiled graph -- this class alone chooses. Paged steps of many sequences (the
    server's) run the modules eagerly on a pool of blocks beside the one-sequence cache; a lone
    sequence's one-token steps take the fused step on that cache (`_solo_step`)."""

    def __init__(
        self,
        model: Transformer,
        max_seq_len: int,
        *,
        compile: bool = False,
        compile_prefill: bool = False,
        fused_decode: bool = True,
    ):
        super().__init__()
        self.model = model.eval()
        self.args = model.args
        self.max_seq_len = max_seq_len
        self.device = str(model.norm.weight.device)
        self.weight_bytes = weight_bytes_per_token(model)
        self.kernels = use_kernels(model)  # kernel-backed modules, where this CPU has them
        if (compile_prefill or (compile and not _decode_on_own_kernels(model))) and (
            _packed_kernels_behind_fp32(model)
        ):
            raise TorchchatError(
                "--compile: torch 2.13's inductor cannot compile the int8/int4 kernels behind fp32 "
                'activations: add "precision": {"dtype": "bf16"} to the --quantize recipe (the '
                "kernels run in bf16 either way), or drop --compile"
            )
        model.setup_caches(1, max_seq_len)
        if self.kernels:  # decode streams weights at up to ~1.5x in 2 MiB pages
            place_in_huge_pages(model)
        # One sequence's decode steps on the fused kernel step where it applies: the compiled graph
        # measured no faster (stories110M, 2 threads, same weights: 0-34% slower, bench/
        # decode_profile.py) after 25-90 s of compiling, so --compile keeps the steps it does not take.
        self.fused_decode = self.fuse_decode(fused_decode)
        # The plan holds the weights and a copy of int4 scales: loaded weights renew it.
        model.register_load_state_dict_post_hook(self._renew_plan)
        self._decode_fn = self._forward_last
        self._prefill_fn = self._forward_last
        self._solo: tuple[int, int] | None = None  # (sequence, positions) the static cache holds
        self._gather: tuple[Tensor, Tensor] | None = None  # paged steps' key/value copies
        if compile_prefill:  # dynamic shapes reach aten's int4 kernel (decode: torchchat's ops)
            prepare_aten_int4(model)  # its layout, made before tracing
        if compile and not self.fused_decode:
            # Static shapes for one-token decode: one graph, reused at every position.
            self._decode_fn = torch.compile(
                _own_code(self._forward_last), fullgraph=True, dynamic=False, options=DECODE_OPTIONS
            )
        if compile_prefill:
            self._prefill_fn = torch.compile(
                _own_code(self._forward_last), fullgraph=True, dynamic=True
            )

    def fuse_decode(self, on: bool = True) -> bool:
        """Run one-token steps of one sequence through the fused kernel step (on stories110M
        int4, 2 threads: 1.6 ms a token against 3.6-4.5 for the modules, 1.6-2.1 for their
        compiled graph), or not. True if it applies (`runtime.kernel_modules.decode_plan`).
        After writing weights in place, call it again: the plan keeps a copy of int4 scales."""
        self._fuse = on
        self._plan = decode_plan(self.model) if on and self.kernels else None
        return self._plan is not None

    def _renew_plan(self, *_) -> None:
        self.fuse_decode(self._fuse)

    def _fused_last(self, tokens: Tensor, input_pos: Tensor) -> Tensor | None:
        """The last logits of one token by the fused step, or None where it does not run."""
        m, plan = self.model, self._plan
        if plan is None or not fused.takes(tokens, input_pos, m.freqs):
            return None
        if not self._plan_current():  # .to() or setup_caches made new tensors since
            return None
        plan = self._plan
        x = fused.decode_step(plan, m.tok_embeddings(tokens), m.freqs, m.causal_mask, input_pos)
        return None if x is None else m.output(m.norm(x)).float()[0, -1]

    def _positions(self, start_pos: int, n: int) -> Tensor:
        return torch.arange(start_pos, start_pos + n, device=self.device)

    def _forward_last(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self.model(tokens, input_pos, last_only=True)[0, -1]

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        self._solo = None
        return self.model(tokens.to(self.device), self._positions(start_pos, tokens.shape[1]))

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, start_pos: int) -> Tensor:
        self._solo = None
        return self._prefill_fn(tokens.to(self.device), self._positions(start_pos, tokens.shape[1]))

    @torch.inference_mode()
    def decode(self, token: Tensor, pos: int) -> Tensor:
        self._solo = None
        token, input_pos = token.to(self.device), self._positions(pos, 1)
        logits = self._fused_last(token, input_pos)
        return self._decode_fn(token, input_pos) if logits is None else logits

    def setup_paged(self, block_size: int, max_blocks: int) -> bool:
        if block_size < 1 or max_blocks < 1:
            raise ValueError("block_size and max_blocks must be at least 1")
        self.model.setup_paged(block_size, max_blocks)
        self.block_size = block_size
        return True

    def reserve_blocks(self, blocks: int) -> None:
        self.model.grow_paged(blocks)

    def copy_blocks(self, copies: Sequence[tuple[int, int, int]]) -> None:
        self.model.copy_blocks(copies)

    def kv_cache_bytes(self) -> int:
        caches = [(a.kv_cache, a.paged) for a in (layer.attention for layer in self.model.layers)]
        tensors = [
            t for c in caches for cache in c if cache is not None for t in (cache.k, cache.v)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def step(self, chunks: Sequence[SeqChunk]) -> Tensor:
        if len(chunks) == 1 and len(chunks[0].tokens) == 1:
            logits = self._solo_step(chunks[0])
            if logits is not None:
                return logits[None]
        self._solo = None  # paged steps write the pool only: the static cache falls behind
        if sum(len(c.tokens) for c in chunks) <= self.FUSED_ROWS:
            logits = self._fused_paged(chunks)
            if logits is not None:
                return logits
        tokens, layout = self._layout(chunks)
        return self.model.forward_paged(tokens, layout)

    # Steps of up to this many tokens run on one call of the fused step (its linears take them
    # 8 at a time over each thread's weight rows: the weights read once a call); longer ones on
    # the modules, whose GEMMs compute more per weight read. bench/paged_step.py (stories110M
    # fp32, 2 threads, 8 sequences decoding 200 positions in and a prompt chunk): 8 + 16 tokens
    # 65-77 ms fused against 83-93 on the modules (three calls of 8: 80-88); 8 + 40 tokens
    # 112-124 on the modules against 125-132 fused in two calls.
    FUSED_ROWS = kernels.STEP_ROWS

    @property
    def step_rows(self) -> int | None:
        return kernels.STEP_ROWS if self._plan is not None else None

    def _fused_paged(self, chunks: Sequence[SeqChunk]) -> Tensor | None:
        """The step on one call of the fused kernel step over the pool, or None where it does
        not apply (nothing written then). Each token is a row (a prompt chunk's rows attend their
        own sequence's positions up to theirs: every row's keys and values of a layer are written
        before any row attends). stories110M fp32, 8 streams, 2 threads: the modules spent ~20 ms
        a step of ~50 outside the linears (Python, dispatch and ~25 small ops a layer), which the
        fused step does not."""
        m, plan = self.model, self._plan
        if plan is None or m.freqs.dtype != torch.float32 or not self._plan_current():
            return None
        layers = [layer.attention.paged for layer in m.layers]
        k_pools, v_pools = [p.k for p in layers], [p.v for p in layers]
        rows = [(c, c.start + i, t) for c in chunks for i, t in enumerate(c.tokens)]
        bs, dev = self.block_size, self.device
        n = max(p for _, p, _ in rows) // bs + 1  # blocks each row's index spans
        tables = torch.tensor([(list(c.blocks[:n]) + [0] * n)[:n] for c, _, _ in rows])
        index = (tables[:, :, None] * bs + torch.arange(bs)).view(len(rows), -1).to(dev)
        pos = torch.tensor([p for _, p, _ in rows], device=dev)
        x = m.tok_embeddings(torch.tensor([t for _, _, t in rows], device=dev))
        h = fused.decode_step_paged(plan, x, m.freqs, pos, index, k_pools, v_pools)
        if h is None:
            return None
        ends = [j for j, (c, p, _) in enumerate(rows) if p == c.start + len(c.tokens) - 1]
        return m.output(m.norm(h[ends])).float()

    def _plan_current(self) -> bool:
        """Whether the fused step's plan holds the model's tensors (renewed if not)."""
        first = self.model.layers[0]
        if self._plan.norms[0] is first.attention_norm.weight and (
            self._plan.k_caches[0] is first.attention.kv_cache.k
        ):
            return True
        return self.fuse_decode(self._fuse)

    def _rows(self, blocks: Sequence[int], end: int) -> Tensor:
        """Pool rows of positions 0..end-1 of a sequence with block table `blocks`."""
        bs = self.block_size
        table = torch.tensor(blocks[: -(-end // bs)], dtype=torch.long)
        return (table[:, None] * bs + torch.arange(bs)).view(-1)[:end]

    def _layout(self, chunks: Sequence[SeqChunk]) -> tuple[Tensor, PagedStep]:
        """The rows of a paged step: sequences decoding one token, in groups the few-row
        attention kernel takes (so a row computes the same in any group), then the prompt
        chunks, each a group of its own or packed with others that share its prefix."""
        decoding = [i for i, c in enumerate(chunks) if len(c.tokens) == 1]
        size = kernels.MAX_ROWS
        groups = [decoding[i : i + size] for i in range(0, len(decoding), size)]
        groups += _packed_prompts(chunks, self.block_size)
        ids, positions, write, parts, last = [], [], [], [], [0] * len(chunks)
        for group in groups:
            members = [chunks[i] for i in group]
            ends = [c.start + len(c.tokens) for c in members]
            reads = [self._rows(c.blocks, end) for c, end in zip(members, ends, strict=True)]
            start = len(ids)
            for c, end, rows in zip(members, ends, reads, strict=True):
                write.append(rows[c.start :])
                positions.append(torch.arange(c.start, end))
                ids += c.tokens
            if len(members[0].tokens) == 1:  # decoding: a row each, per_row
                t = max(ends)
                read = torch.zeros(len(group), t, dtype=torch.long)
                for row, (end, rows) in enumerate(zip(ends, reads, strict=True)):
                    read[row, :end] = rows
                    last[group[row]] = start + row
                mask = (torch.arange(t)[None] < torch.tensor(ends)[:, None])[:, None, None]
                parts.append(AttentionGroup(start, len(group), 1, read, mask, True))
                continue
            # prompt chunks: one query row each token, over the prefix their sequences share
            # (read once), then each one's own positions; a row sees its own sequence's up to its
            shared = _shared_positions(members, self.block_size)
            own = [rows[shared:] for rows in reads]
            read = torch.cat([reads[0][:shared], *own])
            mask = torch.zeros(len(ids) - start, len(read), dtype=torch.bool)
            row, col = 0, shared
            for c, end, i, mine in zip(members, ends, group, own, strict=True):
                seen = self.model.causal_mask[c.start : end, :end]
                mask[row : row + len(c.tokens), :shared] = seen[:, :shared]
                mask[row : row + len(c.tokens), col : col + len(mine)] = seen[:, shared:]
                row, col = row + len(c.tokens), col + len(mine)
                last[i] = start + row - 1
            split = _prefix_split(members, [len(o) for o in own], mask, shared)
            parts.append(AttentionGroup(start, 1, row, read[None], mask[None, None], False, split))
        dev = self.device
        layout = PagedStep(
            torch.cat(positions).to(dev),
            torch.cat(write).to(dev),
            [
                AttentionGroup(
                    g.start,
                    g.batch,
                    g.queries,
                    g.read.to(dev),
                    g.mask.to(dev),
                    g.per_row,
                    g.split and g.split.to(dev),
                )
                for g in parts
            ],
            torch.tensor(last, device=dev),
            self._gather_buffers,
        )
        return torch.tensor([ids], device=dev), layout

    def _gather_buffers(self, rows: int) -> tuple[Tensor, Tensor]:
        """The buffers paged steps gather keys and values into, kept across steps (grown)."""
        pool = self.model.layers[0].attention.paged.k
        if self._gather is None or self._gather[0].shape[0] < rows:
            shape = (max(rows, 2 * (0 if self._gather is None else self._gather[0].shape[0])),)
            shape += (pool[0].numel(),)
            self._gather = tuple(
                torch.empty(shape, dtype=pool.dtype, device=pool.device) for _ in "kv"
            )
        return self._gather

    def _solo_step(self, chunk: SeqChunk) -> Tensor | None:
        """One token of a lone sequence on the fused step, or None where it does not apply: the
        fused kernel reads a contiguous cache, so the sequence's positions are copied into the
        static cache once (when it becomes the lone one) and each new position back to its block."""
        if self._plan is None:
            return None
        pos, bs = chunk.start, self.block_size
        token = torch.tensor([list(chunk.tokens)], device=self.device)
        if self._solo != (chunk.seq, pos):
            self.model.rows_from_paged(self._rows(chunk.blocks, pos).to(self.device))
        logits = self._fused_last(token, self._positions(pos, 1))
        if logits is None:
            self._solo = None
            return None
        self.model.position_to_paged(pos, chunk.blocks[pos // bs] * bs + pos % bs)
        self._solo, self.cached = (chunk.seq, pos + 1), []
        return logits


def _shared_positions(chunks: Sequence[SeqChunk], block_size: int) -> int:
    """Positions every chunk's rows see, the same in all their sequences: the blocks their
    block tables begin with alike, up to the earliest chunk's start."""
    tables = [c.blocks for c in chunks]
    blocks = 0
    while all(len(t) > blocks and t[blocks] == tables[0][blocks] for t in tables):
        blocks += 1
    return min(blocks * block_size, min(c.start for c in chunks))


def _prefix_split(
    chunks: Sequence[SeqChunk], own: Sequence[int], mask: Tensor, shared: int
) -> PrefixSplit | None:
    """The group's attention as its shared prefix and each chunk's own columns (`PrefixSplit`),
    or None where nothing is shared. `own`: each chunk's own columns, in order after the prefix;
    `mask` (queries, columns), the group's."""
    if shared == 0:
        return None
    sizes = [len(c.tokens) for c in chunks]
    most_rows, most_cols = max(sizes), max(own)
    row0 = torch.tensor([0, *sizes]).cumsum(0)[:-1, None]
    col0 = shared + torch.tensor([0, *own]).cumsum(0)[:-1, None]
    live_rows = torch.arange(most_rows) < torch.tensor(sizes)[:, None]
    live_cols = torch.arange(most_cols) < torch.tensor(own)[:, None]
    rows = torch.where(live_rows, row0 + torch.arange(most_rows), row0)
    cols = torch.where(live_cols, col0 + torch.arange(most_cols), col0)
    seen = mask[rows[:, :, None], cols[:, None, :]] & live_rows[:, :, None] & live_cols[:, None]
    take = (torch.arange(len(chunks))[:, None] * most_rows + torch.arange(most_rows))[live_rows]
    return PrefixSplit(shared, rows, cols, seen[:, None], take)


PACK_WASTE = 1.5


def _packed_prompts(chunks: Sequence[SeqChunk], block_size: int) -> list[list[int]]:
    """The prompt chunks (of more than one token) of a step in attention groups: chunks whose
    sequences share their first blocks (a system prompt, a chat's earlier turns) go in one group,
    the shared positions read once, when that computes at most PACK_WASTE times the scores of
    attending apart (a row also meets the other chunks' own positions, masked). stories110M
    fp32, 2 threads, 15 chunks of 10 tokens over 924 positions, 912 of them shared: 338-397 ms
    a step against 436-491 apart (each chunk gathered its 924 positions for its attention)."""
    prompts = [i for i, c in enumerate(chunks) if len(c.tokens) > 1]
    by_first: dict[int, list[int]] = {}
    for i in prompts:
        c = chunks[i]
        key = c.blocks[0] if c.start >= block_size else -1 - i  # nothing shared before start
        by_first.setdefault(key, []).append(i)
    groups = []
    for members in by_first.values():
        ends = [chunks[i].start + len(chunks[i].tokens) for i in members]
        queries = sum(len(chunks[i].tokens) for i in members)
        shared = _shared_positions([chunks[i] for i in members], block_size)
        union = shared + sum(e - shared for e in ends)
        apart = sum(len(chunks[i].tokens) * e for i, e in zip(members, ends, strict=True))
        if len(members) > 1 and queries * union <= PACK_WASTE * apart:
            groups.append(members)
        else:
            groups += [[i] for i in members]
    return groups


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every parameter and weight buffer except the
    embedding table (only one row of it is read), unless the table doubles as the output."""
    emb = model.tok_embeddings
    skip = (
        set()
        if model.output.weight is emb.weight
        else {id(t) for t in (*emb.parameters(), *emb.buffers())}
    )
    skip |= {
        id(t)
        for name, t in model.named_buffers()
        if "kv_cache" in name or name in ("freqs", "causal_mask")
    }
    seen = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _decode_on_own_kernels(model: Transformer) -> bool:
    """True when torchchat's CPU kernels (not aten's packed ones) run the model's quantized
    linears in a one-token decode step, so a compiled decode graph holds none of aten's."""
    from torchchat.quant.linear import Int4Linear

    if model.norm.weight.device.type != "cpu":
        return False
    need = kernels.INT4 if any(isinstance(m, Int4Linear) for m in model.modules()) else 0
    return kernels.simd_level() & (kernels.FEW_ROWS | need) == kernels.FEW_ROWS | need


def _packed_kernels_behind_fp32(model: Transformer) -> bool:
    """True when an fp32 model holds linears run by the packed int8 (per channel) / int4 kernels."""
    from torchchat.quant.linear import Int4Linear, Int8Linear

    packed = any(
        isinstance(m, Int4Linear) or (isinstance(m, Int8Linear) and m.groupsize == 0)
        for m in model.modules()
    )
    return packed and model.norm.weight.dtype == torch.float32
