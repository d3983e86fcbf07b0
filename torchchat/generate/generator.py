"""The generation loop shared by the CLI, chat and server: prefill, decode, stop rules, metrics."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from torchchat.errors import TorchchatError
from torchchat.generate.sampling import make_generator, sample
from torchchat.generate.speculative import Speculator
from torchchat.options import SamplingOptions
from torchchat.runtime.base import ModelRuntime, peak_memory_mb
from torchchat.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Metrics:
    """What one generation cost."""

    prompt_tokens: int = 0  # tokens prefilled by this call
    cached_tokens: int = 0  # prompt tokens reused from the KV cache instead
    draft_proposed: int = 0  # speculative decoding: tokens the draft proposed ...
    draft_accepted: int = 0  # ... and how many of them the target kept
    new_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    prefill_s: float = 0.0
    decode_s: float = 0.0  # time for the tokens after the first

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


def format_metrics(metrics: Metrics, runtime: ModelRuntime, cached: int = 0) -> str:
    """One line: tokens, time to first token, prefill and decode speed, GB/s, peak memory and
    the draft's acceptance; `cached` prompt tokens were reused from the KV cache."""
    gbps = runtime.weight_bytes * metrics.decode_tps / 1e9
    cache_note = f" (+{cached} reused from cache)" if cached else ""
    spec_note = ""
    if metrics.draft_proposed:
        rate = metrics.draft_accepted / metrics.draft_proposed
        spec_note = f"; draft acceptance {100 * rate:.0f}% ({metrics.draft_accepted}/{metrics.draft_proposed})"
    return (
        f"prompt {metrics.prompt_tokens} tokens{cache_note}, generated {metrics.new_tokens}; "
        f"time to first token {metrics.ttft_s:.3f} s; prefill {metrics.prefill_tps:.1f} tok/s; "
        f"decode {metrics.decode_tps:.1f} tok/s; {gbps:.2f} GB/s; "
        f"peak memory {peak_memory_mb(runtime.device):.0f} MB{spec_note}"
    )


@dataclass
class Result:
    """The outcome of one generation."""

    tokens: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    text: str = ""
    finish_reason: str = "length"  # "stop" (stop token or string) or "length"
    fed_until: int = 0  # positions [0, fed_until) of the KV cache hold this sequence
    pending: int | None = None  # the last sampled id, not yet fed to the model
    metrics: Metrics = field(default_factory=Metrics)


class TextStream:
    """One sequence's sampled tokens -> the text to stream, under the stop rules: a stop token or
    stop string ends it ("stop"), so does the token budget ("length"). Fills `result` as it goes.
    Shared by Generator.stream and the server's batched engine, so both stop alike."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prev_token: int,
        max_new: int,
        stop_strings: Sequence[str],
        result: Result,
    ):
        self.result, self.max_new, self.stop_strings = result, max_new, stop_strings
        self.stop_ids = tokenizer.stop_ids
        self.decoder = StreamDecoder(tokenizer, prev_token)
        self.held: str | None = ""  # text withheld because it may be the start of a stop string
        self.done = False

    def push(self, token: int) -> str:
        """Take the next sampled token; return the text now safe to show (maybe ""). Sets `done`
        when the sequence has ended (then `flush` gives what was held back)."""
        res = self.result
        if token in self.stop_ids:
            res.finish_reason, self.done = "stop", True
            return ""
        res.tokens.append(token)
        res.metrics.new_tokens = len(res.tokens)
        self.held += self.decoder.push(token)
        out, self.held, hit = _split_stop(self.held, self.stop_strings)
        res.text += out
        if hit:
            res.finish_reason, self.done = "stop", True
            self.held = None  # the stop string ends the text; nothing after it is shown
        elif len(res.tokens) >= self.max_new:
            self.done = True
        return out

    def flush(self) -> str:
        """At the end: the text held back (a partial stop string, an incomplete character)."""
        if self.held is None:
            return ""
        held, self.held = self.held + self.decoder.flush(), None
        out, _, _ = _split_stop(held, self.stop_strings, final=True)
        self.result.text += out
        return out


class Generator:
    """Generates text from a ModelRuntime and a Tokenizer; knows nothing of how the model runs."""

    def __init__(
        self, runtime: ModelRuntime, tokenizer: Tokenizer, speculator: Speculator | None = None
    ):
        self.runtime, self.tokenizer, self.speculator = runtime, tokenizer, speculator

    def stream_reusing_prefix(self, prompt: Sequence[int], **kwargs) -> Iterator[str]:
        """Like stream() from position 0, but skip prefilling the longest prefix of `prompt`
        that the KV cache already holds (always re-feeding the last prompt token for logits)."""
        reuse = 0
        for a, b in zip(self.runtime.cached, prompt[:-1], strict=False):
            if a != b:
                break
            reuse += 1
        result = kwargs.pop("result", None) or Result()
        yield from self.stream(prompt[reuse:], start_pos=reuse, result=result, **kwargs)
        result.metrics.cached_tokens = reuse

    def stream(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        sampling: SamplingOptions,
        start_pos: int = 0,
        stop_strings: Sequence[str] = (),
        prev_token: int | None = None,
        result: Result | None = None,
        on_logits: Callable[[torch.Tensor], None] | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as they complete. `prompt` is fed at start_pos; earlier positions
        must already hold the sequence's beginning. Pass a `Result` to receive tokens and metrics.
        `on_logits` sees the fp32 logits (vocab,) of every step before its token is sampled (for
        logprobs; raising from it aborts the generation); not available with a speculator."""
        res = result if result is not None else Result()
        if on_logits is not None and self.speculator is not None:
            raise TorchchatError("per-step logits are not available with speculative decoding")
        observe = on_logits or (lambda logits: None)
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise TorchchatError(
                "empty prompt: nothing to condition on (a BOS token at least is needed)"
            )
        room = self.runtime.max_seq_len - start_pos - n_prompt
        if room <= 0:
            raise TorchchatError(
                f"prompt of {n_prompt} tokens (at position {start_pos}) does not fit the context of "
                f"{self.runtime.max_seq_len} tokens; shorten it or raise --max-seq-length"
            )
        max_new = min(max_new_tokens, room + 1)  # the last sampled token needs no cache slot
        rng = make_generator(sampling.seed, "cpu")
        prev = prev_token if prev_token is not None else prompt[-1]
        text = TextStream(self.tokenizer, prev, max_new, stop_strings, res)
        m = res.metrics
        m.prompt_tokens = n_prompt

        # Positions from start_pos on are about to change: forget them until we finish.
        known = self.runtime.cached[:start_pos]
        self.runtime.cached = []
        t0 = time.perf_counter()
        logits = self.runtime.prefill(torch.tensor([list(prompt)], dtype=torch.long), start_pos)
        pos = start_pos + n_prompt
        observe(logits)
        token = sample(logits.cpu(), sampling, rng)
        m.ttft_s = m.prefill_s = time.perf_counter() - t0
        spec = self.speculator
        if spec is not None:
            spec.prefill(known + list(prompt), start_pos)
            proposed0, accepted0 = spec.stats.proposed, spec.stats.accepted
        queue: deque[int] = deque()  # tokens already chosen (speculation yields several at once)
        t1 = time.perf_counter()
        while True:
            out = text.push(token)
            if out:
                yield out
            if text.done:
                break
            if not queue:
                if spec is not None:  # all but the last of these are fed to the model already
                    queue.extend(spec.step(token, pos, sampling, rng))
                else:
                    logits = self.runtime.decode(torch.tensor([[token]], dtype=torch.long), pos)
                    observe(logits)
                    queue.append(sample(logits.cpu(), sampling, rng))
            token = queue.popleft()
            pos += 1
        m.decode_s = time.perf_counter() - t1
        if spec is not None:
            m.draft_proposed = spec.stats.proposed - proposed0
            m.draft_accepted = spec.stats.accepted - accepted0
        out = text.flush()
        if out:
            yield out
        res.fed_until, res.pending = pos, token
        if len(known) == start_pos:  # else what precedes start_pos is not ours to vouch for
            self.runtime.cached = (known + list(prompt) + res.tokens)[:pos]


def _split_stop(text: str, stops: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """Split text into (safe to emit, held back, stop hit). Emitted text never contains a stop."""
    if not stops:
        return text, "", False
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    if final:
        return text, "", False
    keep = 0  # longest suffix of text that is a proper prefix of some stop string
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return text[: len(text) - keep], text[len(text) - keep :], False
