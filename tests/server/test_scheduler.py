"""The scheduler alone: decodes every step, prompt chunks within the token budget, arrival
order, waiting for a shared prefix being computed, preemption when the pool runs out."""

from __future__ import annotations

from torchchat.server.kv_blocks import KVCacheManager
from torchchat.server.scheduler import Scheduler, Sequence


def scheduler(blocks: int = 64, chunk: int = 8, running: int = 4) -> Scheduler:
    return Scheduler(KVCacheManager(blocks, 4), running, chunk, context=256)


def run(s: Scheduler) -> dict[int, tuple[int, int]]:
    """One step: {sequence id: (start, count)}; sampled sequences get a new token."""
    plan = s.schedule()
    s.advance(plan)
    for w in plan.work:
        if w.samples:
            w.seq.tokens.append(7)
    return {w.seq.id: (w.start, w.count) for w in plan.work}


def test_idle_prompts_go_whole_then_decode_one_token_a_step():
    s = scheduler()
    a, b = Sequence(list(range(30))), Sequence(list(range(50, 55)))
    s.add(a)
    s.add(b)
    assert run(s) == {a.id: (0, 30), b.id: (0, 5)}  # nobody decodes: no budget to keep
    assert run(s) == {a.id: (30, 1), b.id: (5, 1)}
    assert s.running == [a, b] and not s.waiting


def test_a_prompt_arriving_among_decodes_is_chunked_within_the_budget():
    s = scheduler(chunk=8)
    a = Sequence([1, 2, 3])
    s.add(a)
    run(s)
    long, short = Sequence(list(range(100, 120))), Sequence([9, 9, 9])
    s.add(long)
    s.add(short)
    # the long prompt takes the budget; the short one (at most a chunk left) goes whole anyway
    assert run(s) == {a.id: (3, 1), long.id: (0, 8), short.id: (0, 3)}
    assert run(s) == {a.id: (4, 1), long.id: (8, 8), short.id: (3, 1)}
    assert run(s) == {a.id: (5, 1), long.id: (16, 4), short.id: (4, 1)}
    assert run(s) == {a.id: (6, 1), long.id: (20, 1), short.id: (5, 1)}


def test_with_step_rows_a_chunk_fills_the_decoding_rows_last_call():
    """A runtime that computes 8 tokens a call: 3 decoding sequences leave 5 rows of their call,
    so a long prompt takes 5 tokens a step (not the 16 of prefill_chunk); 4 decoding: 4."""
    s = Scheduler(KVCacheManager(64, 4), 8, 16, context=256, step_rows=8)
    runs = [Sequence([i, i]) for i in range(3)]
    for seq in runs:
        s.add(seq)
    run(s)
    long = Sequence(list(range(100, 140)))
    s.add(long)
    assert run(s)[long.id] == (0, 5)
    assert run(s)[long.id] == (5, 5)
    s.add(fourth := Sequence([5, 5]))
    step = run(s)  # the short prompt goes whole, budget spent or not
    assert (step[long.id], step[fourth.id]) == ((10, 5), (0, 2))
    assert run(s)[long.id] == (15, 4)  # 4 decoding now: 4 rows of their call left


def test_with_step_rows_a_chunk_takes_at_least_half_a_call():
    """7 decoding sequences leave 1 row of a call of 8: the prompt takes 4 (half a call) a step,
    not 1; 8 decoding fill theirs: 4 again."""
    s = Scheduler(KVCacheManager(64, 4), 9, 16, context=256, step_rows=8)
    for i in range(7):
        s.add(Sequence([i, i]))
    run(s)
    long = Sequence(list(range(100, 140)))
    s.add(long)
    assert run(s)[long.id] == (0, 4)
    s.add(Sequence([7, 7]))
    run(s)
    assert run(s)[long.id] == (8, 4)


def test_short_prompts_arriving_together_go_in_one_step_and_long_ones_wait_their_turn():
    """Chats behind a cached system prompt: every short remainder in the next step, so each gets
    its first token after one step; a long prompt behind them waits for the chunk budget."""
    s = scheduler(chunk=8, running=6)
    a = Sequence([1, 2, 3])
    s.add(a)
    run(s)
    shorts = [Sequence([i] * 7) for i in range(4)]  # 28 tokens in all, 7 each
    long = Sequence(list(range(100, 120)))
    for seq in [*shorts, long]:
        s.add(seq)
    assert run(s) == {a.id: (3, 1), **{x.id: (0, 7) for x in shorts}}  # budget spent: long waits
    assert run(s) == {a.id: (4, 1), **{x.id: (7, 1) for x in shorts}, long.id: (0, 8)}


def test_at_most_max_running_sequences():
    s = scheduler(running=2)
    seqs = [Sequence([i, i]) for i in range(3)]
    for seq in seqs:
        s.add(seq)
    assert set(run(s)) == {seqs[0].id, seqs[1].id}
    s.remove(seqs[0])
    assert set(run(s)) == {seqs[1].id, seqs[2].id}


def test_a_shared_prefix_is_computed_once():
    s = scheduler(chunk=4)
    system = list(range(100, 112))  # 3 full blocks
    a, b = Sequence([*system, 1]), Sequence([*system, 2, 3])
    s.add(a)
    s.add(b)
    assert run(s) == {a.id: (0, 13)}  # b waits for the blocks a is computing
    assert run(s) == {a.id: (13, 1), b.id: (12, 2)}  # then starts after them
    assert (a.cached, b.cached) == (0, 12)


def test_a_prompt_copies_the_cached_positions_of_its_first_differing_block():
    s = scheduler(chunk=4)
    system = list(range(100, 110))  # 2 full blocks, then 2 tokens into the third
    a = Sequence([*system, 1, 2])
    s.add(a)
    run(s)
    run(s)  # a decodes: its third block fills up and is cached
    b = Sequence([*system, 5, 6])
    s.add(b)
    plan = s.schedule()
    a_blocks = s.kv.table(a.id)
    assert [(c.seq, c.src, c.count) for c in plan.copies] == [(b.id, a_blocks[2], 2)]
    assert plan.copies[0].dst == s.kv.table(b.id)[2] != a_blocks[2]
    assert [(w.seq, w.start, w.count) for w in plan.work][-1] == (b, 10, 2)
    s.advance(plan)
    assert b.cached == 10


def test_out_of_blocks_preempts_the_newest_which_resumes_from_the_cache():
    s = scheduler(blocks=4, chunk=64)  # 16 positions
    a, b = Sequence(list(range(6))), Sequence(list(range(20, 26)))
    s.add(a)
    s.add(b)
    run(s)  # 2 blocks each
    for _ in range(2):
        run(s)  # positions 6, 7: still 2 blocks each
    plan = s.schedule()  # a needs a third block: none is free, b (the newest) gives its back
    assert plan.preempted == [b] and [w.seq for w in plan.work] == [a]
    assert s.waiting[0] is b and b.num_computed == 0
    s.advance(plan)
    for w in plan.work:
        w.seq.tokens.append(7)
    s.remove(a)
    n = len(b.tokens)
    assert run(s) == {b.id: (4, n - 4)}  # its first full block was still cached


def test_a_lone_sequence_that_outgrows_the_pool_is_out_of_room():
    s = scheduler(blocks=2, chunk=64)  # 8 positions
    a = Sequence(list(range(8)))
    s.add(a)
    run(s)
    plan = s.schedule()  # position 8 needs a third block
    assert plan.out_of_room == [a] and not plan.work and not s.running
