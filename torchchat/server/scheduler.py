"""What the batched engine runs each step (vLLM v1's scheduler, in small).

A sequence holds every token it knows: its prompt, then each sampled token. The last one is
always still to be fed (its logits pick the next token); `num_computed` tokens have their keys
and values in the cache. Each step feeds every running sequence the tokens it lacks:

- decoding sequences (one token to feed) always take part, one token each;
- sequences still prefilling take a chunk of their prompt, in arrival order, within the step's
  budget of `prefill_chunk` prompt tokens (fewer where the runtime computes a step's tokens
  `step_rows` at a time: the decoding rows' last call filled, at least half a call) -- so a
  long prompt arriving does not stall the others. A prompt with at most `prefill_chunk` tokens
  left goes whole, budget or not (it is done in this step, and many short prompts arriving
  together -- chats behind one cached system prompt -- get their first tokens after one step
  instead of one step each; vLLM's long_prefill_token_threshold draws the same line): such a
  step is bounded all the same, by `max_running` x `prefill_chunk` tokens. With nobody
  decoding there is nobody to stall: the budget is the whole context;
- waiting sequences are admitted (oldest first) while fewer than `max_running` run and the
  budget lasts, starting after the longest cached prefix of their tokens -- whole blocks
  shared, then the first positions of a cached block that begins as its next one does, copied
  (`Plan.copies`). One whose next block is being computed by a running sequence waits for it
  (a shared prompt is prefilled once).

When the pool has no block left for a running sequence, the newest running sequence is
preempted: its blocks are freed (hashed ones stay cached) and it goes back to the front of the
queue, to be prefilled again -- mostly from the cache -- when room comes back. A sequence that
needs more than the whole pool alone is reported `out_of_room`.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from torchchat.server.kv_blocks import KVCacheManager

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One choice being generated, as the scheduler sees it."""

    tokens: list[int]  # prompt, then sampled tokens; the last is not fed yet
    id: int = field(default_factory=lambda: next(_ids))
    num_computed: int = 0  # tokens whose keys/values are in the cache
    cached: int | None = None  # tokens found in the prefix cache when first admitted

    @property
    def to_feed(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass(frozen=True)
class Work:
    """Feed seq.tokens[start:start + count] at positions start.. this step."""

    seq: Sequence
    start: int
    count: int
    prefill: bool  # a chunk of tokens not sampled here (a prompt, or a preempted sequence's)

    @property
    def samples(self) -> bool:
        """The chunk ends at the sequence's last token: its logits pick the next one."""
        return self.start + self.count == len(self.seq.tokens)

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens[self.start : self.start + self.count]


@dataclass(frozen=True)
class Copy:
    """Before the step: positions 0..count-1 of block `src` into block `dst` (sequence `seq`'s
    own block, which begins as `src` does)."""

    seq: int
    src: int
    dst: int
    count: int


@dataclass
class Plan:
    """One step: block copies to make first, the work to run, and sequences the scheduler had
    to stop."""

    copies: list[Copy] = field(default_factory=list)
    work: list[Work] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # back in the queue
    out_of_room: list[Sequence] = field(default_factory=list)  # removed: the pool is too small


class Scheduler:
    """Running and waiting sequences, and each step's plan over a KVCacheManager."""

    def __init__(
        self,
        kv: KVCacheManager,
        max_running: int,
        prefill_chunk: int,
        context: int,
        step_rows: int | None = None,
    ):
        if max_running < 1 or prefill_chunk < 1 or (step_rows is not None and step_rows < 1):
            raise ValueError("max_running, prefill_chunk and step_rows must be at least 1")
        self.kv, self.max_running = kv, max_running
        self.prefill_chunk, self.context, self.step_rows = prefill_chunk, context, step_rows
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (admitted by a later `schedule`)."""
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.id)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> Plan:
        """The next step's work (see the module docstring)."""
        plan = Plan()
        budget = self._budget(sum(s.to_feed == 1 for s in self.running))
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            count = 1 if seq.to_feed == 1 else self._chunk(seq.to_feed, budget)
            if count == 0:  # prefilling, and the budget is spent
                i += 1
                continue
            while not self.kv.allocate(seq.id, seq.num_computed + count):
                victim = self.running[-1]
                if victim is seq and i == 0:  # alone, and the whole pool is not enough
                    self.running.pop()
                    self.kv.free(seq.id)
                    plan.out_of_room.append(seq)
                    break
                self._preempt(victim, plan)
                if victim is seq:
                    break
            else:
                if seq.to_feed > 1:
                    budget -= count
                plan.work.append(Work(seq, seq.num_computed, count, seq.to_feed > 1))
                i += 1
                continue
        if not plan.preempted:
            self._admit(plan, budget)
        return plan

    def _budget(self, decoding: int) -> int:
        """Prompt tokens a step may take besides `decoding` one-token feeds. With `step_rows`
        (the runtime computes that many tokens a call, each call reading all the weights), a
        chunk fills the decoding rows' last call, and takes at least half a call (a prompt
        behind 23 decoding rows of 24 a call does not crawl a token a step): a step costs about
        one call more than theirs at most."""
        if not decoding:
            return self.context
        if self.step_rows is None:
            return self.prefill_chunk
        return min(self.prefill_chunk, max(-decoding % self.step_rows, self.step_rows // 2))

    def _chunk(self, left: int, budget: int) -> int:
        """Prompt tokens a sequence with `left` to prefill takes this step: all of a short
        remainder, else what the budget has left."""
        return left if left <= self.prefill_chunk else max(0, min(left, budget))

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        self.running.remove(seq)
        self.kv.free(seq.id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _admit(self, plan: Plan, budget: int) -> None:
        for seq in list(self.waiting):
            if len(self.running) >= self.max_running:
                return
            hits, wait = self.kv.match(seq.tokens)
            if wait:
                continue  # its next block is being computed: admit it once that is cached
            source, copy = self.kv.partial(seq.tokens, hits) or (None, 0)
            done = len(hits) * self.kv.block_size + copy
            count = self._chunk(len(seq.tokens) - done, budget)
            if count == 0:
                continue  # a long prompt, and the budget is spent: short ones may still go
            if not self.kv.can_start(hits, done + count, source):
                return  # the oldest waits for room; the ones after it wait behind it
            self.waiting.remove(seq)
            self.kv.start(seq.id, seq.tokens, hits, source)
            self.kv.allocate(seq.id, done + count)
            if source is not None:
                own = self.kv.table(seq.id)[len(hits)]
                plan.copies.append(Copy(seq.id, source.id, own, copy))
            seq.num_computed = done
            if seq.cached is None:
                seq.cached = done
            self.running.append(seq)
            plan.work.append(Work(seq, done, count, True))
            budget -= count

    def advance(self, plan: Plan) -> None:
        """The plan's step ran: its copies are made, its tokens' keys/values are in the cache."""
        for c in plan.copies:
            self.kv.copied(c.seq)
        for w in plan.work:
            w.seq.num_computed = w.start + w.count
            self.kv.commit(w.seq.id, w.seq.tokens, w.seq.num_computed)
