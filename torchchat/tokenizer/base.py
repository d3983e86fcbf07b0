"""The tokenizer interface shared by the sentencepiece, tiktoken and Hugging Face backends."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

from torchchat.errors import TorchchatError

# Tokens that end an assistant turn in common chat formats; generation stops on any of them.
END_OF_TURN_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
)


class TokenOutOfRange(TorchchatError, IndexError):
    """A token id past the tokenizer's vocabulary: a model's output there means the tokenizer is
    not the model's (shown as one line, exit 1, like every TorchchatError)."""

    def __init__(self, token_id: int, vocab_size: int) -> None:
        super().__init__(
            f"token id {token_id} is outside the tokenizer's {vocab_size} tokens: "
            "is the tokenizer (--tokenizer-path) the model's own?"
        )


class Tokenizer(ABC):
    """Text <-> token ids, plus the per-token bytes needed for streaming output."""

    kind: str
    bos_id: int | None
    eos_id: int | None
    # Text form of BOS/EOS, as chat templates spell them.
    bos_token: str | None
    eos_token: str | None
    stop_ids: frozenset[int]
    vocab_size: int
    # True when decoding drops the dummy-prefix space of the first piece (sentencepiece style).
    strips_leading_space: bool
    # A jinja chat template shipped with the tokenizer (HF tokenizer_config.json, GGUF metadata).
    chat_template: str | None = None

    @abstractmethod
    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids for text; with allow_special, special-token strings become their ids."""

    def special_strings(self) -> Iterable[str]:
        """The texts that `encode(..., allow_special=True)` turns into control-token ids."""
        return ()

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer's own encoding of a text starts with BOS, as Hugging Face's
        `encode` would: Meta's sentencepiece and tiktoken Llama tokenizers always do."""
        return self.bos_id is not None

    @cached_property
    def _control_pattern(self) -> re.Pattern[str] | None:
        return specials_pattern(self.special_strings())

    def encode_prompt(self, text: str, literal: Sequence[tuple[int, int]] = ()) -> list[int]:
        """`encode(text, allow_special=True)`, except that special-token strings overlapping a
        literal span [start, end) -- a chat message's own text -- stay plain text, so a user
        cannot type a control token into the prompt (as Meta's reference encoders do it)."""
        pattern = self._control_pattern
        hits = list(pattern.finditer(text)) if pattern is not None else []
        keep = [m for m in hits if not any(a < m.end() and m.start() < b for a, b in literal)]
        if len(keep) == len(hits):  # the usual case: exactly the tokenizer's own encoding
            return self.encode(text, allow_special=True)
        ids, pos = [], 0
        for m in keep:
            ids += self.encode(text[pos : m.start()]) if m.start() > pos else []
            ids.append(self.special_token_id(m.group()))
            pos = m.end()
        return ids + (self.encode(text[pos:]) if pos < len(text) else [])

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes this token contributes when decoded in the middle of a sequence."""

    @abstractmethod
    def special_token_id(self, text: str) -> int | None:
        """Id of the special/control token spelled `text`, or None."""

    def decode(self, ids: Sequence[int]) -> str:
        """Full decode: the joined token bytes as UTF-8, minus the dummy-prefix space."""
        return join_token_bytes(self, ids)


def join_token_bytes(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Decode by concatenating token_bytes; the reference rule that streaming reproduces."""
    text = b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    if tokenizer.strips_leading_space and text.startswith(" "):
        text = text[1:]
    return text


def stop_ids_for(eos_id: int | None, special_ids: Mapping[str, int]) -> frozenset[int]:
    """EOS plus whichever known end-of-turn tokens this vocabulary has."""
    ids = {special_ids[name] for name in END_OF_TURN_TOKENS if name in special_ids}
    if eos_id is not None:
        ids.add(eos_id)
    return frozenset(ids)


def specials_pattern(specials: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of the special-token strings (None if there are none)."""
    # Longest first, so a token wins over a shorter one that is its prefix.
    names = sorted((s for s in specials if s), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None


def split_on_specials(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    """Split text around special-token strings, keeping them as items; drops empty pieces."""
    parts = pattern.split(text) if pattern is not None else [text]
    return [part for part in parts if part]
