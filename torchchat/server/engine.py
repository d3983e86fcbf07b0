"""The one owner of the model: a worker thread serves queued jobs, in arrival order.

HTTP handlers never touch the model. They submit a `Job` and read its events from an asyncio
queue; setting `job.cancelled` (client gone) stops the generation before its next step.
Admission counts free seats in the batch first: a job is refused (`QueueFull`) only when more
than `max_queue` jobs would be left waiting for one.

With a runtime that has a paged KV cache (`max_batch` > 1), the worker does continuous batching
in three parts, as vLLM's v1 engine does: the scheduler (server/scheduler.py) picks each step's
work -- one token for every decoding choice, and chunks of prompts within a token budget -- the
KV-cache manager (server/kv_blocks.py) gives each sequence its blocks and shares the blocks of
common prefixes, and the runtime runs the step over exactly those tokens (`ModelRuntime.step`).
Nothing is computed for idle seats: a lone choice costs what it costs alone.
Otherwise (an exported model, speculative decoding, --max-batch 1) jobs are served one at a time.

A choice that scores its prompt (`echo` with `logprobs`) gets its prompt's token logprobs from
one forward pass over the whole prompt (`ModelRuntime.score`), samples its first token from it,
and, if it goes on, is scheduled like any other (its prompt computed again, in the pool).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from torchchat.errors import TorchchatError
from torchchat.generate.generator import Generator, Result, TextStream
from torchchat.generate.sampling import make_generator, sample
from torchchat.generate.speculative import Speculator
from torchchat.options import SamplingOptions
from torchchat.runtime.base import ModelRuntime, SeqChunk
from torchchat.server.kv_blocks import KVCacheManager
from torchchat.server.scheduler import Scheduler, Sequence
from torchchat.tokenizer import Tokenizer

log = logging.getLogger("torchchat.server")


class QueueFull(Exception):
    """No room left in the request queue."""


class Cancelled(Exception):
    """The client went away: stop generating for it."""


@dataclass(frozen=True)
class Choice:
    """One completion to generate: a prompt, its token budget and how to sample."""

    index: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingOptions
    first_of_prompt: bool = True  # its prompt's cached tokens count in usage (once per prompt)
    score_prompt: bool = False  # send its prompt tokens' logprobs (a PromptScores event) first


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives at its step (both
    None for a prompt's first token: nothing precedes it)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass(frozen=True)
class PromptScores:
    """The logprobs of choice `index`'s prompt tokens; sent before any Piece of that choice."""

    index: int
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class Piece:
    """New text of choice `index`, with the logprobs of the tokens generated since the last one."""

    index: int
    text: str
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class Finish:
    """Choice `index` is complete."""

    index: int
    finish_reason: str
    completion_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob]  # of tokens whose text was held back and never emitted


@dataclass(frozen=True)
class Failed:
    """The job failed; `status` 400 for a problem with the request, 500 for a bug."""

    status: int
    message: str
    code: str  # the OpenAI error `code`


@dataclass(frozen=True)
class End:
    """Every choice of the job is complete."""


Event = PromptScores | Piece | Finish | Failed | End
GONE = Failed(499, "the client closed the request", "client_closed")  # nginx's status for it
SHUTDOWN = Failed(503, "the server is shutting down", "server_shutting_down")
INTERNAL = Failed(500, "internal error while generating (see the server log)", "internal_error")


def invalid(error: TorchchatError) -> Failed:
    """A request the model cannot serve, found while serving it."""
    return Failed(400, str(error), "invalid_request")


@dataclass
class Job:
    """A request's work and the channel its events go back on."""

    choices: list[Choice]
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token and k alternatives
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    unfinished: int = field(default=0, init=False)  # choices not finished yet (batched engine)

    @property
    def top(self) -> int:
        """Alternatives to list with each logprob (0 when logprobs are off)."""
        return self.top_logprobs or 0

    def emit(self, event: Event) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    async def next_event(self) -> Event:
        """The next event of this job (awaited by the request handler)."""
        return await self.events.get()


class LogprobRecorder:
    """Turns each step's logits into a TokenLogprob once the token sampled from them is known."""

    def __init__(self, top: int, tokens: list[int]):
        self.top = top
        self.tokens = tokens  # Result.tokens, which the generator fills as it goes
        self.entries: list[TokenLogprob] = []
        self.sent = 0  # entries already handed out
        self._pending: torch.Tensor | None = None  # log-probs of the step not yet resolved

    def observe(self, logits: torch.Tensor) -> None:
        """Called with each step's logits, before its token is sampled."""
        self.resolve()
        self._pending = torch.log_softmax(logits.detach().float().cpu(), dim=-1)

    def resolve(self) -> None:
        """Record the pending step if its token has been appended to the result."""
        i = len(self.entries)
        if self._pending is None or i >= len(self.tokens):
            return
        self._record(self.tokens[i])

    def stop(self, token: int) -> None:
        """The sequence ended on stop token `token`: its logprob is listed too (as vLLM does)."""
        self.resolve()
        if self._pending is not None:
            self._record(token)

    def _record(self, token: int) -> None:
        lp, self._pending = self._pending, None
        self.entries.append(TokenLogprob(token, float(lp[token]), top_logprobs(lp, self.top)))

    def take(self) -> list[TokenLogprob]:
        """Entries not handed out yet."""
        self.resolve()
        new = self.entries[self.sent :]
        self.sent = len(self.entries)
        return new


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) of one step's log-probabilities (vocab,)."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
    return [(int(t), float(v)) for t, v in zip(ids, values, strict=True)]


def score_prompt(
    runtime: ModelRuntime, prompt: list[int], top: int
) -> tuple[list[TokenLogprob], torch.Tensor]:
    """One forward pass over the prompt from position 0 (eval's scoring call): each token's
    logprob given the ones before it (the first has none), and the last position's logits."""
    logits = runtime.score(prompt).float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    entries = [TokenLogprob(prompt[0], None, None)]
    for row, token in zip(logprobs, prompt[1:], strict=False):
        entries.append(TokenLogprob(token, float(row[token]), top_logprobs(row, top)))
    return entries, logits[-1]


@dataclass
class EngineStats:
    """Counters for /metrics."""

    requests: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    decode_steps: int = 0  # batched steps that decoded ...
    decode_rows: int = 0  # ... and the choices they advanced (rows / steps: mean batch size)
    prefill_tokens: int = 0  # prompt tokens computed by batched steps (cached ones are not)
    kv_blocks_used: int = 0  # KV blocks held by sequences after the last step
    preempted: int = 0  # choices whose blocks were taken back (recomputed later)


@dataclass
class Decoding:
    """A choice being generated by the batched engine: its sequence and how to sample it."""

    job: Job
    choice: Choice
    seq: Sequence  # the scheduler's view: tokens, and how many are in the cache
    text: TextStream  # stop rules and detokenization
    rng: torch.Generator  # the choice's own: seeded requests never share random state
    rec: LogprobRecorder | None
    scored: bool = False  # its prompt was scored: computed here, none of it counts as cached


class Arrival:
    """A request the HTTP layer has begun to read, counted by its engine until `end` (or
    `Engine.submit` of its job): an idle engine's first step waits for the requests of a burst."""

    def __init__(self, engine: Engine):
        self._engine, self._open = engine, True
        with engine._lock:
            engine._arriving += 1

    def end(self) -> None:
        with self._engine._lock:
            self.end_locked()

    def end_locked(self) -> None:
        if self._open:
            self._open = False
            self._engine._arriving -= 1
            self._engine._lock.notify_all()


class Engine:
    """Owns the runtime (and so its KV caches); serves jobs on its own thread, up to max_batch
    choices at once when the runtime has a paged KV cache."""

    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: Tokenizer,
        speculator: Speculator | None = None,
        max_queue: int = 16,
        max_batch: int = 8,
        kv_blocks: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 256,
    ):
        self.runtime, self.tokenizer, self.speculator = runtime, tokenizer, speculator
        self.generator = Generator(runtime, tokenizer, speculator)
        self.stats = EngineStats()
        self.running = 0  # jobs being generated
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()  # submitted, not started; guarded by _lock
        self._lock = threading.Condition()
        self._busy = 0  # seats claimed by started jobs' unfinished choices; guarded by _lock
        self._arriving = 0  # requests being read by the HTTP layer (`Arrival`); guarded by _lock
        self._stop = threading.Event()
        # A speculator keeps one sequence's cache (the draft's) in step with the target's.
        self.max_batch = max_batch
        kv_blocks = kv_blocks or max_batch * -(-runtime.max_seq_len // block_size)
        self.batched = (
            max_batch > 1 and speculator is None and runtime.setup_paged(block_size, kv_blocks)
        )
        if self.batched:
            self.kv = KVCacheManager(kv_blocks, block_size)
            self.scheduler = Scheduler(
                self.kv, max_batch, prefill_chunk, runtime.max_seq_len, runtime.step_rows
            )
        self._decoding: dict[int, Decoding] = {}  # choices started, by sequence id
        self._started: list[Job] = []  # jobs with a choice in the scheduler
        work = self._work_batched if self.batched else self._work
        self._thread = threading.Thread(target=work, name="torchchat-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        """Positions in the KV cache: prompt plus completion must fit."""
        return self.runtime.max_seq_len

    @property
    def waiting(self) -> int:
        """Jobs queued, not started yet."""
        return len(self._queue)

    def _seats_needed(self, job: Job) -> int:
        return len(job.choices) if self.batched else 1  # unbatched: one job at a time

    @property
    def arriving(self) -> int:
        """Requests being read, their jobs not queued yet (`arrival`)."""
        return self._arriving

    def arrival(self) -> Arrival:
        """Count a request from its first bytes until its job is submitted (or it ends): an
        idle engine waits for the requests of a burst before its first step (`_await_burst`)."""
        return Arrival(self)

    def submit(self, job: Job, arrival: Arrival | None = None) -> None:
        """Queue a job, or raise QueueFull when more than max_queue jobs would wait for a seat
        in the batch (jobs that fit the seats left free count as starting, not waiting). The
        job's `arrival` ends as it is queued."""
        with self._lock:
            if arrival is not None:
                arrival.end_locked()
            if self._stop.is_set():
                raise QueueFull("the server is shutting down")
            free = (self.max_batch if self.batched else 1) - self._busy
            waiting = 0
            for queued in [*self._queue, job]:  # served in order: once one waits, all after do
                if waiting == 0 and self._seats_needed(queued) <= free:
                    free -= self._seats_needed(queued)
                else:
                    waiting += 1
            if waiting > self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._queue.append(job)
            self._lock.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker; a generation under way ends at its next step."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:  # answer whoever still waits in the queue
            while self._queue:
                self._queue.popleft().emit(SHUTDOWN)

    def _next_job(self, wait: bool) -> Job | None:
        """The oldest queued job whose client is still there (waiting a little if `wait`); it
        is started: its seats count as claimed."""
        with self._lock:
            while True:
                if not self._queue and wait:
                    self._lock.wait(0.1)
                if not self._queue:
                    return None
                job = self._queue.popleft()
                if not job.cancelled.is_set():
                    self._busy += self._seats_needed(job)
                    return job
                self.stats.cancelled += 1  # its client left while it waited
                job.emit(GONE)

    def _release(self, seats: int) -> None:
        with self._lock:
            self._busy -= seats

    def _work(self) -> None:
        while not self._stop.is_set():
            if (job := self._next_job(wait=True)) is None:
                continue
            self.running = 1
            t0 = time.perf_counter()
            try:
                self._serve(job)
                self.stats.requests += 1
            except Cancelled:
                self.stats.cancelled += 1
                # Lets a handler still waiting on the job return.
                job.emit(SHUTDOWN if self._stop.is_set() else GONE)
            except TorchchatError as e:
                self.stats.failed += 1
                job.emit(invalid(e))
            except Exception:
                log.exception("generation failed")
                self.stats.failed += 1
                job.emit(INTERNAL)
            finally:
                self.running = 0
                self._release(1)
                self.stats.busy_s += time.perf_counter() - t0

    def _serve(self, job: Job) -> None:
        for choice in job.choices:
            self._generate(job, choice)
        job.emit(End())

    def _count_prompt(self, choice: Choice, cached_tokens: int) -> None:
        if choice.first_of_prompt:
            self.stats.prompt_tokens += len(choice.prompt)
            self.stats.cached_tokens += cached_tokens

    def _generate(self, job: Job, choice: Choice) -> None:
        if choice.score_prompt:
            if job.cancelled.is_set() or self._stop.is_set():
                raise Cancelled
            entries, _ = score_prompt(self.runtime, choice.prompt, job.top)
            job.emit(PromptScores(choice.index, entries))
        if choice.max_tokens == 0:  # only the prompt was asked for
            self._count_prompt(choice, 0)
            job.emit(Finish(choice.index, "length", 0, 0, []))
            return
        res = Result()
        rec = LogprobRecorder(job.top, res.tokens) if job.top_logprobs is not None else None

        def on_logits(logits: torch.Tensor) -> None:
            # Runs before every decode step's sampling: the soonest a cancel can take effect.
            if job.cancelled.is_set() or self._stop.is_set():
                raise Cancelled
            if rec is not None:
                rec.observe(logits)

        # A speculator decodes several tokens per step and exposes no per-step logits (the
        # server refuses logprobs then); cancellation is checked at each piece instead.
        hook = {"on_logits": on_logits} if self.speculator is None else {}
        stream = self.generator.stream_reusing_prefix(
            choice.prompt,
            max_new_tokens=choice.max_tokens,
            sampling=choice.sampling,
            stop_strings=job.stop,
            result=res,
            **hook,
        )
        for text in stream:
            if job.cancelled.is_set() or self._stop.is_set():
                stream.close()
                raise Cancelled
            job.emit(Piece(choice.index, text, rec.take() if rec else []))
        if rec is not None and res.pending in self.tokenizer.stop_ids:
            rec.stop(res.pending)
        # A scored prompt was computed here, whatever the cache held before.
        cached = 0 if choice.score_prompt else res.metrics.cached_tokens
        self._count_prompt(choice, cached)
        self.stats.completion_tokens += len(res.tokens)
        job.emit(
            Finish(
                choice.index,
                res.finish_reason,
                len(res.tokens),
                cached,
                rec.take() if rec else [],
            )
        )

    # Continuous batching: everything below runs on the worker thread of a batched engine.

    def _work_batched(self) -> None:
        while not self._stop.is_set():
            if not self._started:  # idle: wait for a job
                if (job := self._next_job(wait=True)) is None:
                    continue
                self._begin(job)
                self._await_burst()
            t0 = time.perf_counter()
            self._take_jobs()
            for job in [j for j in self._started if j.cancelled.is_set()]:
                self.stats.cancelled += 1
                self._end_job(job, GONE)
            if self._decoding:
                try:
                    self._step()
                except Exception:
                    log.exception("batched step failed")
                    for job in list(self._started):
                        self.stats.failed += 1
                        self._end_job(job, INTERNAL)
            self.stats.busy_s += time.perf_counter() - t0
        for job in list(self._started):
            self.stats.cancelled += 1
            self._end_job(job, SHUTDOWN)

    def _begin(self, job: Job) -> None:
        """Start a job: each of its choices is queued in the scheduler (or done at once)."""
        job.unfinished = len(job.choices)
        self._started.append(job)
        self.running += 1
        for choice in job.choices:
            try:
                self._queue_choice(job, choice)
            except TorchchatError as e:
                self.stats.failed += 1
                self._end_job(job, invalid(e))
            except Exception:
                log.exception("starting a choice failed")
                self.stats.failed += 1
                self._end_job(job, INTERNAL)
            if job.unfinished == 0 or not any(j is job for j in self._started):
                return

    # Longest an idle engine waits for requests still being read before its first step.
    BURST_WAIT_S = 0.1

    def _await_burst(self) -> None:
        """Before the first step after idle: wait while requests are still being read (at most
        BURST_WAIT_S, and not once the batch is full), so a burst starts as one step. A lone
        request waits for nothing (its own arrival ended when it was queued). 15 chats sharing
        a 900-token system prompt arrived within 3 ms and were queued over 60 ms: the first ran
        a step alone (~100 ms) that the other 14 then waited for."""
        deadline = time.monotonic() + self.BURST_WAIT_S
        with self._lock:
            while self._arriving > 0 and len(self._queue) + self._busy < self.max_batch:
                if (left := deadline - time.monotonic()) <= 0:
                    return
                self._lock.wait(left)

    def _take_jobs(self) -> None:
        """Start queued jobs while the batch has free seats."""
        sched = self.scheduler
        while len(sched.running) + len(sched.waiting) < self.max_batch:
            if (job := self._next_job(wait=False)) is None:
                return
            self._begin(job)

    def _queue_choice(self, job: Job, choice: Choice) -> None:
        """Check a choice's prompt and hand it to the scheduler. A prompt to score is fed whole
        at once (eval's scoring call, on the runtime's one-sequence cache), its first token
        sampled from that; a choice asking for no tokens is done there."""
        prompt, context = choice.prompt, self.runtime.max_seq_len
        if not prompt:
            raise TorchchatError("empty prompt: nothing to condition on")
        if len(prompt) > context or (len(prompt) == context and choice.max_tokens > 0):
            raise TorchchatError(
                f"prompt of {len(prompt)} tokens does not fit the context of {context} tokens"
            )
        if len(prompt) > self.kv.max_positions:
            raise TorchchatError(
                f"prompt of {len(prompt)} tokens does not fit the KV cache of "
                f"{self.kv.max_positions} positions (--kv-blocks x --block-size)"
            )
        logits = None
        if choice.score_prompt:
            entries, logits = score_prompt(self.runtime, prompt, job.top)
            job.emit(PromptScores(choice.index, entries))
        if choice.max_tokens == 0:
            self._finish(job, choice, Finish(choice.index, "length", 0, 0, []), 0)
            return
        res = Result()
        max_new = min(choice.max_tokens, context - len(prompt) + 1)  # the last needs no position
        d = Decoding(
            job,
            choice,
            Sequence(list(prompt)),
            TextStream(self.tokenizer, prompt[-1], max_new, job.stop, res),
            make_generator(choice.sampling.seed, "cpu"),
            LogprobRecorder(job.top, res.tokens) if job.top_logprobs is not None else None,
            scored=logits is not None,
        )
        self._decoding[d.seq.id] = d
        if logits is not None:
            d.seq.cached = 0
            if not self._sampled(d, logits):  # finished on its first token
                return
        self.scheduler.add(d.seq)

    def _step(self) -> None:
        """Run the scheduler's next step and sample every sequence whose chunk ends its tokens."""
        plan = self.scheduler.schedule()
        for seq in plan.out_of_room:  # alone and the whole KV pool is not enough: stop here
            self._stop_choice(self._decoding[seq.id], "length")
        if not plan.work:
            return
        self.runtime.reserve_blocks(self.kv.pool.capacity)
        if plan.copies:
            self.runtime.copy_blocks([(c.src, c.dst, c.count) for c in plan.copies])
        chunks = [SeqChunk(w.seq.id, w.tokens, w.start, self.kv.table(w.seq.id)) for w in plan.work]
        logits = self.runtime.step(chunks).cpu()
        self.scheduler.advance(plan)
        decodes = sum(1 for w in plan.work if not w.prefill)
        self.stats.decode_steps += decodes > 0
        self.stats.decode_rows += decodes
        self.stats.prefill_tokens += sum(w.count for w in plan.work if w.prefill)
        self.stats.preempted += len(plan.preempted)
        self.stats.kv_blocks_used = self.kv.pool.in_use
        for w, row in zip(plan.work, logits, strict=True):
            if w.samples and w.seq.id in self._decoding:
                self._sampled(self._decoding[w.seq.id], row)

    def _sampled(self, d: Decoding, logits: torch.Tensor) -> bool:
        """Sample the choice's next token from its logits (vocab,); emit the text it completes.
        False when that finished the choice."""
        if d.rec is not None:
            d.rec.observe(logits)
        token = sample(logits, d.choice.sampling, d.rng)
        index, rec = d.choice.index, d.rec
        out = d.text.push(token)
        if out:
            d.job.emit(Piece(index, out, rec.take() if rec else []))
        if not d.text.done:
            d.seq.tokens.append(token)
            return True
        if out := d.text.flush():
            d.job.emit(Piece(index, out, rec.take() if rec else []))
        if rec is not None and token in self.tokenizer.stop_ids:
            rec.stop(token)
        self._stop_choice(d, d.text.result.finish_reason)
        return False

    def _stop_choice(self, d: Decoding, reason: str) -> None:
        """A choice is complete: free its sequence, count it, send its Finish."""
        self._decoding.pop(d.seq.id, None)
        self.scheduler.remove(d.seq)
        cached = 0 if d.scored else d.seq.cached or 0
        rec, res = d.rec, d.text.result
        finish = Finish(d.choice.index, reason, len(res.tokens), cached, rec.take() if rec else [])
        self._finish(d.job, d.choice, finish, cached)

    def _finish(self, job: Job, choice: Choice, finish: Finish, cached_tokens: int) -> None:
        """Count and send a finished choice; the job ends with its last one."""
        self._count_prompt(choice, cached_tokens)
        self.stats.completion_tokens += finish.completion_tokens
        job.emit(finish)
        job.unfinished -= 1
        self._release(1)
        if job.unfinished == 0:
            self.stats.requests += 1
            self._end_job(job, End())

    def _end_job(self, job: Job, event: Event) -> None:
        """Stop all of a job's choices (their cached blocks stay cached) and send its last event."""
        if not any(j is job for j in self._started):
            return  # ended already
        for d in [d for d in self._decoding.values() if d.job is job]:
            del self._decoding[d.seq.id]
            self.scheduler.remove(d.seq)
        self._started = [j for j in self._started if j is not job]
        self._release(job.unfinished)
        job.unfinished = 0
        self.running -= 1
        job.emit(event)
