"""The one owner of the model: a worker thread serves queued jobs, in arrival order.

HTTP handlers never touch the model. They submit a `Job` (bounded queue: `QueueFull` when
full) and read its events from an asyncio queue; setting `job.cancelled` (client gone) stops
the generation before its next decode step.

With a runtime that batches (`max_batch` > 1), the worker does continuous batching: each choice
gets a slot (a row of the KV cache) as soon as one is free, its prompt is prefilled alone into
that slot, and then one decode step advances every slot at once. A step always runs over all
slots, idle ones included, so a choice's tokens are the same whoever else is being served.
Otherwise (an exported model, speculative decoding, --max-batch 1) jobs are served one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
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
from torchchat.runtime.base import ModelRuntime
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


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives at its step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


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


@dataclass(frozen=True)
class End:
    """Every choice of the job is complete."""


Event = Piece | Finish | Failed | End
GONE = Failed(499, "the client closed the request")  # nginx's status for it
SHUTDOWN = Failed(503, "the server is shutting down")
INTERNAL = Failed(500, "internal error while generating (see the server log)")


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
        lp, token = self._pending, self.tokens[i]
        top: list[tuple[int, float]] = []
        if self.top > 0:
            values, ids = torch.topk(lp, min(self.top, lp.numel()))
            top = [(int(t), float(v)) for t, v in zip(ids, values, strict=True)]
        self.entries.append(TokenLogprob(token, float(lp[token]), top))
        self._pending = None

    def take(self) -> list[TokenLogprob]:
        """Entries not handed out yet."""
        self.resolve()
        new = self.entries[self.sent :]
        self.sent = len(self.entries)
        return new


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
    decode_steps: int = 0  # batched decode steps run ...
    decode_rows: int = 0  # ... and the choices they advanced (rows / steps: mean batch size)


@dataclass
class Decoding:
    """A choice being generated in a slot."""

    job: Job
    choice: Choice
    text: TextStream  # stop rules and detokenization
    rng: torch.Generator  # the choice's own: seeded requests never share random state
    rec: LogprobRecorder | None
    cached_tokens: int  # prompt tokens the slot already held
    pos: int  # where `token` goes at the next step
    token: int = 0  # sampled, not fed yet


@dataclass
class Slot:
    """One row of the KV cache, and the choice generating in it if any."""

    index: int
    held: list[int] = field(default_factory=list)  # ids whose keys/values positions 0.. hold
    seq: Decoding | None = None
    freed_at: int = 0  # when it last became free (of equal candidates, the oldest is reused)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of a and b."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Owns the runtime (and so its KV cache); serves jobs on its own thread, up to max_batch
    choices at once when the runtime can batch."""

    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: Tokenizer,
        speculator: Speculator | None = None,
        max_queue: int = 16,
        max_batch: int = 8,
    ):
        self.runtime, self.tokenizer, self.speculator = runtime, tokenizer, speculator
        self.generator = Generator(runtime, tokenizer, speculator)
        self.stats = EngineStats()
        self.running = 0  # jobs being generated
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        # A speculator keeps one sequence's cache (the draft's) in step with the target's.
        self.batched = max_batch > 1 and speculator is None
        if self.batched:
            runtime.setup_batch(max_batch)
            self.batched = runtime.max_batch > 1  # 1: the runtime cannot batch
        self.slots = [Slot(i) for i in range(runtime.max_batch)] if self.batched else []
        self._backlog: deque[tuple[Job, Choice]] = deque()  # choices of started jobs, no slot yet
        self._started: list[Job] = []  # jobs with a choice in a slot or in the backlog
        self._clock = 0  # counts slots freed
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
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull."""
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._jobs.maxsize} requests are already waiting") from None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker; a generation under way ends at its next step."""
        self._stop.set()
        self._thread.join(timeout)
        while True:  # answer whoever still waits in the queue
            try:
                self._jobs.get_nowait().emit(SHUTDOWN)
            except queue.Empty:
                break

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if job.cancelled.is_set():  # its client left while it waited
                self.stats.cancelled += 1
                job.emit(GONE)
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
                job.emit(Failed(400, str(e)))
            except Exception:
                log.exception("generation failed")
                self.stats.failed += 1
                job.emit(INTERNAL)
            finally:
                self.running = 0
                self.stats.busy_s += time.perf_counter() - t0

    def _serve(self, job: Job) -> None:
        for choice in job.choices:
            self._generate(job, choice)
        job.emit(End())

    def _generate(self, job: Job, choice: Choice) -> None:
        res = Result()
        rec = (
            LogprobRecorder(job.top_logprobs, res.tokens) if job.top_logprobs is not None else None
        )

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
        m = res.metrics
        if choice.first_of_prompt:
            self.stats.prompt_tokens += len(choice.prompt)
            self.stats.cached_tokens += m.cached_tokens
        self.stats.completion_tokens += len(res.tokens)
        job.emit(
            Finish(
                choice.index,
                res.finish_reason,
                len(res.tokens),
                m.cached_tokens,
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
            t0 = time.perf_counter()
            self._admit()
            for job in [j for j in self._started if j.cancelled.is_set()]:
                self.stats.cancelled += 1
                self._end_job(job, GONE)
            if any(slot.seq for slot in self.slots):
                try:
                    self._step()
                except Exception:
                    log.exception("batched decode step failed")
                    for slot in self.slots:
                        slot.held = []  # what the cache holds is unknown now
                    for job in list(self._started):
                        self.stats.failed += 1
                        self._end_job(job, INTERNAL)
            self.stats.busy_s += time.perf_counter() - t0
        for job in list(self._started):
            self.stats.cancelled += 1
            self._end_job(job, SHUTDOWN)

    def _next_job(self, wait: bool) -> Job | None:
        """The oldest queued job whose client is still there (waiting a little if `wait`)."""
        while True:
            try:
                job = self._jobs.get(timeout=0.1) if wait else self._jobs.get_nowait()
            except queue.Empty:
                return None
            if not job.cancelled.is_set():
                return job
            self.stats.cancelled += 1  # its client left while it waited
            job.emit(GONE)

    def _begin(self, job: Job) -> None:
        job.unfinished = len(job.choices)
        self._started.append(job)
        self.running += 1
        self._backlog.extend((job, choice) for choice in job.choices)

    def _admit(self) -> None:
        """Start waiting choices in free slots, oldest first, each prefilled at once."""
        while free := [slot for slot in self.slots if slot.seq is None]:
            if not self._backlog:
                if (job := self._next_job(wait=False)) is None:
                    return
                self._begin(job)
            job, choice = self._backlog.popleft()
            try:
                self._start(job, choice, free)
            except TorchchatError as e:
                self.stats.failed += 1
                self._end_job(job, Failed(400, str(e)))
            except Exception:
                log.exception("prefill failed")
                self.stats.failed += 1
                self._end_job(job, INTERNAL)

    def _start(self, job: Job, choice: Choice, free: list[Slot]) -> None:
        """Prefill a choice's prompt into the free slot where it overwrites the fewest cached
        tokens, after copying in the longest cached prefix of it that any slot holds (choices
        of one prompt, and prompts sharing a beginning, are prefilled once)."""
        prompt, context = choice.prompt, self.runtime.max_seq_len
        if not prompt:
            raise TorchchatError("empty prompt: nothing to condition on")
        if len(prompt) >= context:
            raise TorchchatError(
                f"prompt of {len(prompt)} tokens does not fit the context of {context} tokens"
            )
        # The last prompt token is always fed again: its logits pick the first new token.
        shared = {s.index: shared_prefix(s.held, prompt[:-1]) for s in self.slots}
        # Least cached tokens lost; then most reused in place; then least recently used.
        slot = min(
            free, key=lambda s: (len(s.held) - shared[s.index], -shared[s.index], s.freed_at)
        )
        donor = max(self.slots, key=lambda s: shared[s.index])
        reuse = shared[slot.index]
        if shared[donor.index] > reuse:
            reuse = shared[donor.index]
            self.runtime.copy_slot(donor.index, slot.index, reuse)
            slot.held = donor.held[:reuse]
        del slot.held[reuse:]  # positions from here on are about to change
        logits = self.runtime.prefill_slot(torch.tensor([prompt[reuse:]]), reuse, slot.index)
        slot.held = list(prompt)
        res = Result()
        max_new = min(choice.max_tokens, context - len(prompt) + 1)  # the last needs no position
        slot.seq = Decoding(
            job,
            choice,
            TextStream(self.tokenizer, prompt[-1], max_new, job.stop, res),
            make_generator(choice.sampling.seed, "cpu"),
            LogprobRecorder(job.top_logprobs, res.tokens) if job.top_logprobs is not None else None,
            cached_tokens=reuse,
            pos=len(prompt),
        )
        self._sampled(slot, logits.cpu())

    def _step(self) -> None:
        """One decode step over every slot (idle ones too: the same shapes every step)."""
        last = self.runtime.max_seq_len - 1
        tokens = torch.zeros(len(self.slots), 1, dtype=torch.long)
        positions = torch.full((len(self.slots),), -1, dtype=torch.long)  # -1: idle
        active = [slot for slot in self.slots if slot.seq is not None]
        for slot in self.slots:
            if slot.seq is None:
                del slot.held[last:]  # an idle row's step overwrites its last position
            else:
                tokens[slot.index, 0], positions[slot.index] = slot.seq.token, slot.seq.pos
        logits = self.runtime.decode_batch(tokens, positions).cpu()
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(active)
        for slot in active:
            slot.held.append(slot.seq.token)
            slot.seq.pos += 1
            self._sampled(slot, logits[slot.index])

    def _sampled(self, slot: Slot, logits: torch.Tensor) -> None:
        """Sample the slot's next token from its logits (vocab,); emit the text it completes."""
        seq = slot.seq
        if seq.rec is not None:
            seq.rec.observe(logits)
        token = sample(logits, seq.choice.sampling, seq.rng)
        index, rec = seq.choice.index, seq.rec
        out = seq.text.push(token)
        if out:
            seq.job.emit(Piece(index, out, rec.take() if rec else []))
        if not seq.text.done:
            seq.token = token
            return
        if out := seq.text.flush():
            seq.job.emit(Piece(index, out, rec.take() if rec else []))
        res = seq.text.result
        if seq.choice.first_of_prompt:
            self.stats.prompt_tokens += len(seq.choice.prompt)
            self.stats.cached_tokens += seq.cached_tokens
        self.stats.completion_tokens += len(res.tokens)
        seq.job.emit(
            Finish(
                index,
                res.finish_reason,
                len(res.tokens),
                seq.cached_tokens,
                rec.take() if rec else [],
            )
        )
        self._free(slot)
        seq.job.unfinished -= 1
        if seq.job.unfinished == 0:
            self.stats.requests += 1
            self._end_job(seq.job, End())

    def _free(self, slot: Slot) -> None:
        slot.seq = None
        self._clock += 1
        slot.freed_at = self._clock

    def _end_job(self, job: Job, event: Event) -> None:
        """Stop all of a job's choices (their slots keep their cache) and send its last event."""
        if not any(j is job for j in self._started):
            return  # ended already
        for slot in self.slots:
            if slot.seq is not None and slot.seq.job is job:
                self._free(slot)
        self._backlog = deque((j, c) for j, c in self._backlog if j is not job)
        self._started = [j for j in self._started if j is not job]
        self.running -= 1
        job.emit(event)
