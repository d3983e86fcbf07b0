"""A multi-turn conversation over one KV cache: each turn prefills only its own new tokens."""

from __future__ import annotations

from collections.abc import Iterator

from torchchat.chat.templates import ChatTemplate, new_turn_text, render_spans, tail_spans
from torchchat.errors import TorchchatError
from torchchat.generate.generator import Generator, Result
from torchchat.generate.speculative import Speculator
from torchchat.options import ChatOptions
from torchchat.runtime.base import ModelRuntime
from torchchat.tokenizer import Tokenizer


class ContextFull(TorchchatError):
    """The next turn does not fit in the KV cache."""


class ChatSession:
    """Owns a conversation: message history, what the KV cache holds, and the last result."""

    def __init__(
        self,
        runtime: ModelRuntime,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        opts: ChatOptions,
        speculator: Speculator | None = None,
    ):
        self.generator = Generator(runtime, tokenizer, speculator)
        self.runtime, self.tokenizer, self.template, self.opts = runtime, tokenizer, template, opts
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt)."""
        self.history: list[dict] = []
        if self.opts.system_prompt:
            self.history.append({"role": "system", "content": self.opts.system_prompt})
        self.pos = 0  # positions of the KV cache that hold this conversation
        self.last: Result | None = None
        self.last_cached = 0  # tokens of the last turn's context reused from the cache

    def turn_tokens(self, user_text: str) -> tuple[list[int], int]:
        """Token ids to feed for the next user message, and the position to feed them at."""
        new = [{"role": "user", "content": user_text}]
        last = self.last
        # A reply cut by a stop string left that string's tokens in the cache: re-prefill then.
        cut_by_string = (
            last is not None
            and last.finish_reason == "stop"
            and last.pending not in self.tokenizer.stop_ids
        )
        if last is not None and not cut_by_string:
            prev_msgs = self.history[:-1]  # what the cache's prompt was rendered from
            suffix = new_turn_text(self.template, prev_msgs, last.text, new)
            reply = {"role": "assistant", "content": last.text}
            full, spans = render_spans(self.template, [*prev_msgs, reply, *new])
            if suffix is not None and full.endswith(suffix):
                pending = (
                    [last.pending]
                    if last.finish_reason == "length" and last.pending is not None
                    else []
                )
                spans = tail_spans(spans, len(full), len(suffix))
                return pending + self.tokenizer.encode_prompt(suffix, spans), self.pos
        text, spans = render_spans(self.template, self.history + new)
        return self.tokenizer.encode_prompt(text, spans), 0

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's reply to user_text."""
        tokens, start = self.turn_tokens(user_text)
        limit = self.runtime.max_seq_len
        if start + len(tokens) >= limit:
            raise ContextFull(
                f"context is full: this turn needs {len(tokens)} more tokens but only {limit - start - 1} "
                f"of {limit} remain; /reset to start over, or raise --max-seq-length"
            )
        self.last_cached = start
        res = Result()
        stream = self.generator.stream(
            tokens,
            start_pos=start,
            max_new_tokens=self.opts.max_new_tokens,
            sampling=self.opts.sampling,
            stop_strings=self.opts.stop,
            prev_token=self.tokenizer.bos_id,  # a reply starts like a fresh text: no leading space
            result=res,
        )
        yield from stream
        self.history += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": res.text},
        ]
        self.pos, self.last = res.fed_until, res
