"""SentencePiece tokenizers (Llama 2, TinyStories) via the `sentencepiece` library."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from torchchat.errors import TorchchatError, one_line
from torchchat.tokenizer.base import (
    Tokenizer,
    TokenOutOfRange,
    specials_pattern,
    split_on_specials,
    stop_ids_for,
)

# What sentencepiece prints for an unknown piece (" ⁇ ").
UNKNOWN_BYTES = " \u2047 ".encode()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError, ValueError) as e:
            raise TorchchatError(f"cannot read tokenizer {self.path}: {one_line(e)}") from e
        self._setup(sp, sp.bos_id(), sp.eos_id())

    @classmethod
    def from_model_proto(
        cls,
        proto: bytes,
        source: str,
        *,
        bos_id: int | None,
        eos_id: int | None,
        extra_stop_ids: Iterable[int] = (),
        strips_leading_space: bool = True,
    ) -> SentencePieceTokenizer:
        """A tokenizer from a serialized ModelProto built in memory (e.g. from GGUF metadata)."""
        self = cls.__new__(cls)
        self.path = Path(source)
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except (OSError, RuntimeError, ValueError) as e:
            raise TorchchatError(f"cannot build tokenizer from {source}: {one_line(e)}") from e
        self._setup(sp, bos_id, eos_id, extra_stop_ids, strips_leading_space)
        return self

    def _setup(
        self,
        sp: spm.SentencePieceProcessor,
        bos_id: int | None,
        eos_id: int | None,
        extra_stop_ids: Iterable[int] = (),
        strips_leading_space: bool = True,
    ) -> None:
        self._sp = sp
        self.vocab_size = sp.get_piece_size()
        if self.vocab_size == 0:
            raise TorchchatError(f"cannot read tokenizer {self.path}: empty sentencepiece model")
        self.bos_id = bos_id if bos_id is not None and bos_id >= 0 else None
        self.eos_id = eos_id if eos_id is not None and eos_id >= 0 else None
        self.bos_token = sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
        # Control pieces (<s>, </s>, ...) are the only ones sentencepiece never produces from text.
        self._specials = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self._specials_re = specials_pattern(self._specials)
        self.stop_ids = stop_ids_for(self.eos_id, self._specials) | frozenset(extra_stop_ids)
        self.strips_leading_space = strips_leading_space
        # Each piece's bytes on first use: the whole table took 0.13 s of a 32,000-piece load,
        # ~6% of a GGUF generate's time to its first token.
        self._bytes: dict[int, bytes] = {}

    def _piece_bytes(self, i: int) -> bytes:
        """Bytes for one piece, following sentencepiece's own decoder."""
        sp = self._sp
        if sp.is_control(i):
            return b""
        if sp.is_unknown(i):
            return UNKNOWN_BYTES
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids; with allow_special each segment between control tokens gets its own prefix."""
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        if allow_special:
            for part in split_on_specials(text, self._specials_re):
                special = self._specials.get(part)
                ids.extend([special] if special is not None else self._sp.encode(part))
        elif text:
            ids.extend(self._sp.encode(text))
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """Piece bytes with '▁' as space; byte pieces give one byte, control pieces none."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenOutOfRange(token_id, self.vocab_size)
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self._piece_bytes(token_id)
        return found

    def special_strings(self) -> list[str]:
        return list(self._specials)

    def piece(self, token_id: int) -> tuple[str, float]:
        """The vocabulary entry of an id as the model stores it: piece ('▁' for space), score."""
        return self._sp.id_to_piece(token_id), self._sp.get_score(token_id)

    def special_token_id(self, text: str) -> int | None:
        """Id of a control piece such as '<s>'."""
        return self._specials.get(text)
