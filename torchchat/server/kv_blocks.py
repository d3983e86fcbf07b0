"""The paged KV cache's memory: a pool of fixed-size blocks, a block table per sequence, and
prefix sharing by block hashes (vLLM v1's block_pool.py, kv_cache_manager.py and kv_cache_utils.py).

A sequence's position p lives in block `table[p // block_size]` at offset `p % block_size`; the
tensors themselves belong to the runtime, which only ever sees block ids. Memory follows the
tokens in use: the pool starts empty and grows (up to `max_blocks`) only when no block is free.

A block full of computed tokens gets a hash chained with its parent block's, so equal hashes
mean equal prefixes. Hashed blocks are shared (reference-counted) by every sequence whose
tokens begin the same way; the first block that differs, or is not full, is the sequence's
own, so a shared block is never written. Copy-on-write at that first differing block: when a
cached block after the same prefix begins with some of the sequence's next tokens (a system
prompt ends inside a block, each chat's own message after it), those positions are copied
into the sequence's own block instead of computed again. A freed hashed block keeps its
contents and its hash (a later prompt with that prefix still hits) until it is the least
recently used one and a block is needed.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

GROW_MIN = 32  # blocks the pool grows by at least (otherwise by half its size)


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The hash of a full block of `tokens` following the block hashed `parent` (None: the
    first block): it names the whole prefix, not just this block's tokens."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", tokens).tobytes())
    return h.digest()


def prefix_hashes(tokens: Sequence[int], block_size: int, parent: bytes | None = None) -> list:
    """The chained hashes of every full block of `tokens` (after the block hashed `parent`)."""
    out = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[i : i + block_size])
        out.append(parent)
    return out


@dataclass(eq=False)
class Block:
    """One block of the pool: `refs` sequences use it; `hash` is set once it is full and computed."""

    id: int
    refs: int = 0
    hash: bytes | None = None
    parent: bytes | None = None  # the hash of the block before it (hashed blocks)
    tokens: tuple[int, ...] = ()  # its tokens (hashed blocks)


class BlockPool:
    """Block ids 0..capacity-1: free ones, ones in use, and freed ones kept for their hash (LRU)."""

    def __init__(self, max_blocks: int):
        if max_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.max_blocks = max_blocks
        self.blocks: list[Block] = []
        self._free: list[int] = []  # heap: the lowest ids are used first
        self._evictable: OrderedDict[int, Block] = OrderedDict()  # refs 0, hashed; oldest first
        self._by_hash: dict[bytes, Block] = {}
        # hashed blocks by (parent hash, first token): a prompt's next block is compared only
        # with the cached ones that could share positions with it
        self._children: dict[tuple[bytes | None, int], dict[int, Block]] = {}

    @property
    def capacity(self) -> int:
        """Blocks the runtime must hold tensors for."""
        return len(self.blocks)

    @property
    def available(self) -> int:
        """Blocks `take` can still hand out (free, evictable, or not allocated yet)."""
        return len(self._free) + len(self._evictable) + self.max_blocks - self.capacity

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.capacity - len(self._free) - len(self._evictable)

    def take(self) -> Block:
        """A block for one sequence (refs 1, no hash). Check `available` first."""
        if self._free:
            block = self.blocks[heapq.heappop(self._free)]
        elif self._evictable:
            _, block = self._evictable.popitem(last=False)  # least recently used
            del self._by_hash[block.hash]
            key = (block.parent, block.tokens[0])
            del self._children[key][block.id]
            if not self._children[key]:
                del self._children[key]
            block.hash, block.parent, block.tokens = None, None, ()
        else:
            self._grow()
            block = self.blocks[heapq.heappop(self._free)]
        block.refs = 1
        return block

    def _grow(self) -> None:
        n = self.capacity
        new = min(self.max_blocks, max(n + GROW_MIN, n * 3 // 2))
        if new == n:
            raise RuntimeError("the block pool is full")  # callers check `available`
        self.blocks += [Block(i) for i in range(n, new)]
        for i in range(n, new):
            heapq.heappush(self._free, i)

    def share(self, block: Block) -> None:
        """One more sequence uses `block`."""
        if block.refs == 0:
            del self._evictable[block.id]
        block.refs += 1

    def release(self, block: Block) -> None:
        """One sequence less uses `block`; unused, it is free, or kept for its hash."""
        block.refs -= 1
        if block.refs == 0:
            if block.hash is None:
                heapq.heappush(self._free, block.id)
            else:
                self._evictable[block.id] = block

    def cached(self, h: bytes) -> Block | None:
        """The block holding the prefix hashed h, if any."""
        return self._by_hash.get(h)

    def children(self, parent: bytes | None, first: int) -> list[Block]:
        """The hashed blocks that follow the block hashed `parent` (None: first blocks) and
        begin with token `first`."""
        return list(self._children.get((parent, first), {}).values())

    def register(self, block: Block, h: bytes, parent: bytes | None, tokens: Sequence[int]) -> bool:
        """Make a full, computed block findable by its hash (False: another block has it)."""
        if h in self._by_hash:
            return False
        block.hash, block.parent, block.tokens = h, parent, tuple(tokens)
        self._by_hash[h] = block
        self._children.setdefault((parent, block.tokens[0]), {})[block.id] = block
        return True


@dataclass
class _Table:
    blocks: list[Block] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of blocks[:len(hashes)], all computed
    pending: set[bytes] = field(default_factory=set)  # full blocks this sequence will compute
    source: Block | None = None  # held until its first positions are copied (`copied`)


class KVCacheManager:
    """Block tables of sequences (by id) over one BlockPool, with prefix sharing."""

    def __init__(self, max_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.pool = BlockPool(max_blocks)
        self.block_size = block_size
        self._tables: dict[int, _Table] = {}
        self._pending: dict[bytes, int] = {}  # hash -> sequences about to compute that block

    @property
    def max_positions(self) -> int:
        """Positions the whole pool holds: no sequence can grow longer."""
        return self.pool.max_blocks * self.block_size

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        """The block ids of a sequence, in position order."""
        return [b.id for b in self._tables[seq_id].blocks]

    def match(self, tokens: Sequence[int]) -> tuple[list[Block], bool]:
        """The cached blocks that begin `tokens` (at most len - 1 tokens: the last one is fed for
        its logits), and whether the block after them is being computed by a running sequence
        (then the caller had better wait for it than compute it again)."""
        hits: list[Block] = []
        for h in prefix_hashes(tokens[:-1], self.block_size):
            block = self.pool.cached(h)
            if block is None:
                return hits, h in self._pending
            hits.append(block)
        return hits, False

    def partial(self, tokens: Sequence[int], hits: list[Block]) -> tuple[Block, int] | None:
        """A cached block after the same prefix as the block after `hits` whose first n
        tokens are that block's first tokens of `tokens` (the longest such n > 0, at most up to
        the last token, which is fed for its logits): (block, n), or None."""
        done = len(hits) * self.block_size
        want = tokens[done : min(done + self.block_size, len(tokens) - 1)]
        if not want:
            return None
        best, most = None, 0
        for block in self.pool.children(hits[-1].hash if hits else None, want[0]):
            n = 0
            for a, b in zip(block.tokens, want, strict=False):
                if a != b:
                    break
                n += 1
            if n > most:
                best, most = block, n
        return None if best is None else (best, most)

    def can_start(self, hits: list[Block], positions: int, source: Block | None = None) -> bool:
        """Whether a sequence sharing `hits` (and copying from `source`) can get blocks for
        its first `positions`."""
        revived = sum(1 for b in [*hits, source] if b is not None and b.refs == 0)
        return self.blocks_for(positions) - len(hits) <= self.pool.available - revived

    def start(
        self, seq_id: int, tokens: Sequence[int], hits: list[Block], source: Block | None = None
    ) -> int:
        """Give a sequence a table beginning with the shared `hits`; its other full blocks of
        `tokens` count as being computed (see `match`). `source`, a block whose first positions
        the sequence's next block copies, is held (not evicted) until `copied`. Returns the
        positions shared."""
        table = _Table()
        for block in hits:
            self.pool.share(block)
            table.blocks.append(block)
            table.hashes.append(block.hash)
        if source is not None:
            self.pool.share(source)
            table.source = source
        parent = table.hashes[-1] if hits else None
        done = len(hits) * self.block_size
        table.pending = set(prefix_hashes(tokens[done:], self.block_size, parent))
        for h in table.pending:
            self._pending[h] = self._pending.get(h, 0) + 1
        self._tables[seq_id] = table
        return done

    def allocate(self, seq_id: int, positions: int) -> bool:
        """Grow a sequence's table to hold its first `positions`; False (and nothing taken)
        when the pool has too few blocks left."""
        table = self._tables[seq_id]
        need = self.blocks_for(positions) - len(table.blocks)
        if need > self.pool.available:
            return False
        table.blocks += [self.pool.take() for _ in range(need)]
        return True

    def commit(self, seq_id: int, tokens: Sequence[int], computed: int) -> None:
        """The keys/values of tokens[:computed] are in the sequence's blocks: hash its newly
        full blocks so other sequences may share them."""
        table, bs = self._tables[seq_id], self.block_size
        while (len(table.hashes) + 1) * bs <= computed:
            i = len(table.hashes)
            parent = table.hashes[-1] if table.hashes else None
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            self._unpend(table, h)
            block = table.blocks[i]
            if block.hash is None:  # if another block has it already, keep this private
                self.pool.register(block, h, parent, tokens[i * bs : (i + 1) * bs])
            table.hashes.append(h)

    def copied(self, seq_id: int) -> None:
        """The positions the sequence copies from its source block are copied: let it go."""
        table = self._tables.get(seq_id)
        if table is not None and table.source is not None:
            self.pool.release(table.source)
            table.source = None

    def _unpend(self, table: _Table, h: bytes) -> None:
        if h in table.pending:
            table.pending.discard(h)
            self._pending[h] -= 1
            if not self._pending[h]:
                del self._pending[h]

    def free(self, seq_id: int) -> None:
        """Give back a sequence's blocks (last first: a prefix's tail is evicted before its head)."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        for h in list(table.pending):
            self._unpend(table, h)
        if table.source is not None:
            self.pool.release(table.source)
        for block in reversed(table.blocks):
            self.pool.release(block)
