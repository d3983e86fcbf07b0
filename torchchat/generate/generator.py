"""The generation loop shared by the CLI, chat and server: prefill, decode, stop rules, metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from torchchat.errors import TorchchatError
from torchchat.generate.sampling import SamplingOptions, make_generator, sample
from torchchat.runtime.base import ModelRuntime
from torchchat.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Metrics:
    """What one generation cost."""

    prompt_tokens: int = 0
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


@dataclass
class Result:
    """The outcome of one generation."""

    tokens: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    text: str = ""
    finish_reason: str = "length"  # "stop" (stop token or string) or "length"
    fed_until: int = 0  # positions [0, fed_until) of the KV cache hold this sequence
    pending: int | None = None  # the last sampled id, not yet fed to the model
    metrics: Metrics = field(default_factory=Metrics)


class Generator:
    """Generates text from a ModelRuntime and a Tokenizer; knows nothing of how the model runs."""

    def __init__(self, runtime: ModelRuntime, tokenizer: Tokenizer):
        self.runtime, self.tokenizer = runtime, tokenizer

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
    ) -> Iterator[str]:
        """Yield text pieces as they complete. `prompt` is fed at start_pos; earlier positions
        must already hold the sequence's beginning. Pass a `Result` to receive tokens and metrics."""
        res = result if result is not None else Result()
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
        stops = self.tokenizer.stop_ids
        decoder = StreamDecoder(
            self.tokenizer, prev_token if prev_token is not None else prompt[-1]
        )
        held: str | None = ""  # text withheld because it may be the start of a stop string
        m = res.metrics
        m.prompt_tokens = n_prompt

        t0 = time.perf_counter()
        logits = self.runtime.prefill(torch.tensor([list(prompt)], dtype=torch.long), start_pos)
        pos = start_pos + n_prompt
        token = sample(logits.cpu(), sampling, rng)
        m.ttft_s = m.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        while True:
            if token in stops:
                res.finish_reason = "stop"
                break
            res.tokens.append(token)
            m.new_tokens = len(res.tokens)
            held += decoder.push(token)
            out, held, hit = _split_stop(held, stop_strings)
            if out:
                res.text += out
                yield out
            if hit:
                res.finish_reason = "stop"
                held = None  # the stop string ends the text; nothing after it is shown
                break
            if len(res.tokens) >= max_new:
                break
            logits = self.runtime.decode(torch.tensor([[token]], dtype=torch.long), pos)
            pos += 1
            token = sample(logits.cpu(), sampling, rng)
        m.decode_s = time.perf_counter() - t1
        if held is not None:
            held += decoder.flush()
            out, _, _ = _split_stop(held, stop_strings, final=True)
            if out:
                res.text += out
                yield out
        res.fed_until, res.pending = pos, token


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
