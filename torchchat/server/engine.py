"""The one owner of the model: a worker thread serves queued jobs one at a time, in arrival order.

HTTP handlers never touch the model. They submit a `Job` (bounded queue: `QueueFull` when
full) and read its events from an asyncio queue; setting `job.cancelled` (client gone) stops
the generation before its next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from torchchat.errors import TorchchatError
from torchchat.generate.generator import Generator, Result
from torchchat.generate.sampling import SamplingOptions
from torchchat.generate.speculative import Speculator
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


@dataclass
class Job:
    """A request's work and the channel its events go back on."""

    choices: list[Choice]
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token and k alternatives
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

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


class Engine:
    """Owns the runtime (and so its KV cache); serves jobs one at a time on its own thread."""

    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: Tokenizer,
        speculator: Speculator | None = None,
        max_queue: int = 16,
    ):
        self.runtime, self.tokenizer, self.speculator = runtime, tokenizer, speculator
        self.generator = Generator(runtime, tokenizer, speculator)
        self.stats = EngineStats()
        self.running = False
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="torchchat-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        """Positions in the KV cache: prompt plus completion must fit."""
        return self.runtime.max_seq_len

    @property
    def waiting(self) -> int:
        """Jobs queued behind the one being served."""
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
            self.running = True
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
                job.emit(Failed(500, "internal error while generating (see the server log)"))
            finally:
                self.running = False
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
