"""The KV block pool and block tables alone: allocation, growth, freeing, hashing, sharing,
private blocks after the first difference, LRU of cached blocks, running out."""

from __future__ import annotations

import pytest

from torchchat.server.kv_blocks import BlockPool, KVCacheManager, block_hash, prefix_hashes


def test_hashes_chain_with_the_parent_block():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    assert block_hash(None, a) == block_hash(None, list(a))
    assert block_hash(block_hash(None, a), b) != block_hash(None, b)  # the prefix counts
    assert prefix_hashes([*a, *b, 9], 4) == [
        block_hash(None, a),
        block_hash(block_hash(None, a), b),
    ]
    assert prefix_hashes([1, 2, 3], 4) == []  # no full block


def test_the_pool_grows_only_when_nothing_is_free():
    pool = BlockPool(max_blocks=100)
    assert pool.capacity == 0 and pool.available == 100
    first = [pool.take() for _ in range(32)]
    assert pool.capacity == 32 and [b.id for b in first] == list(range(32))
    pool.release(first[5])
    assert pool.take() is first[5] and pool.capacity == 32  # a free block before growing
    pool.take()
    assert pool.capacity == 64  # grows by at least 32 blocks
    for _ in range(pool.available):
        pool.take()
    assert pool.capacity == 100 and pool.available == 0 and pool.in_use == 100
    with pytest.raises(RuntimeError):
        pool.take()


def test_freed_hashed_blocks_stay_cached_until_needed_least_recently_used_first():
    pool = BlockPool(max_blocks=3)
    a, b, c = pool.take(), pool.take(), pool.take()
    pool.register(a, b"a", None, [1, 2])
    pool.register(b, b"b", None, [3, 4])
    pool.release(a)
    pool.release(b)
    pool.release(c)  # unhashed: free
    assert pool.cached(b"a") is a and pool.available == 3 and pool.in_use == 0
    assert pool.take() is c  # free blocks first
    pool.share(a)  # revived by a hit: no longer evictable
    assert pool.take() is b and pool.cached(b"b") is None  # evicted, hash gone
    assert pool.available == 0
    assert not pool.register(c, b"a", None, [1, 2])  # a hash names one block
    assert pool.children(None, 1) == [a] and pool.children(None, 3) == []  # b's evicted


def manager() -> KVCacheManager:
    return KVCacheManager(max_blocks=8, block_size=4)


def test_prompts_share_full_blocks_and_diverge_into_private_ones():
    kv = manager()
    system = list(range(100, 110))  # 10 tokens: 2 full blocks and 2 more
    p1, p2 = [*system, 1, 2, 3], [*system, 7, 8]
    assert kv.match(p1) == ([], False)
    kv.start(1, p1, [])
    assert kv.allocate(1, len(p1)) and len(kv.table(1)) == 4
    # While seq 1 computes them, its full blocks are pending: seq 2 should wait for them.
    hits, wait = kv.match(p2)
    assert hits == [] and wait
    kv.commit(1, p1, len(p1))
    hits, wait = kv.match(p2)
    assert len(hits) == 2 and not wait
    assert kv.start(2, p2, hits) == 8 and kv.allocate(2, len(p2))
    t1, t2 = kv.table(1), kv.table(2)
    assert t1[:2] == t2[:2] and t1[2] != t2[2]  # shared, then private from the first difference
    assert [kv.pool.blocks[i].refs for i in t1[:2]] == [2, 2]
    kv.free(1)
    assert [kv.pool.blocks[i].refs for i in t1[:2]] == [1, 1]
    kv.free(2)
    assert kv.pool.in_use == 0
    # Freed, the blocks stay cached: the same system prompt still hits.
    assert len(kv.match([*system, 5])[0]) == 2


def test_a_cached_block_that_begins_like_the_next_one_is_copied_from_and_held_until_copied():
    kv = manager()
    system = list(range(100, 110))  # ends 2 tokens into block 2
    p1, p2 = [*system, 1, 2, 3], [*system, 7, 8]
    kv.start(1, p1, [])
    kv.allocate(1, len(p1))
    kv.commit(1, p1, len(p1))  # blocks 0-2 full: hashed; block 2 holds 108, 109, 1, 2
    kv.free(1)  # cached, evictable
    hits, _ = kv.match(p2)
    source, n = kv.partial(p2, hits)
    assert len(hits) == 2 and source.tokens == (108, 109, 1, 2) and n == 2
    assert kv.partial([*system[:9], 5, 6], hits)[1] == 1  # 108 in common
    assert kv.partial([*system[:8], 5, 6], hits) is None  # nothing in common
    assert kv.partial([*system, 1, 2, 3, 4], hits)[1] == 4  # a whole block is a hit, not a copy
    assert kv.partial([*system, 1], hits)[1] == 2  # never the last token (fed for its logits)
    assert kv.can_start(hits, len(p2), source)
    assert kv.start(2, p2, hits, source) == 8
    assert source.refs == 1  # held: taking blocks for seq 2 must not evict it
    for _ in range(kv.pool.available):
        assert kv.pool.take() is not source
    kv.copied(2)
    assert source.refs == 0


def test_the_last_token_is_never_a_hit():
    kv = manager()
    prompt = list(range(8))  # exactly two blocks
    kv.start(1, prompt, [])
    kv.allocate(1, 8)
    kv.commit(1, prompt, 8)
    hits, _ = kv.match(prompt)
    assert len(hits) == 1  # the block holding the last token is computed again (privately)
    assert len(kv.match([*prompt, 9])[0]) == 2


def test_blocks_filled_while_decoding_are_hashed_too():
    kv = manager()
    tokens = [1, 2, 3]
    kv.start(1, tokens, [])
    kv.allocate(1, 3)
    kv.commit(1, tokens, 3)
    tokens += [4, 5, 6]  # generated
    kv.allocate(1, 6)
    kv.commit(1, tokens, 5)  # token 6 not fed yet
    assert len(kv.match([1, 2, 3, 4, 5, 6, 7])[0]) == 1


def test_running_out():
    kv = manager()
    kv.start(1, [0] * 20, [])
    assert kv.allocate(1, 20)  # 5 blocks of 8
    kv.start(2, [1] * 20, [])
    assert not kv.allocate(2, 20)  # 3 left: nothing is taken
    assert kv.table(2) == [] and kv.pool.available == 3
    assert kv.can_start([], 12) and not kv.can_start([], 13)
    kv.free(1)
    assert kv.allocate(2, 20) and kv.max_positions == 32
