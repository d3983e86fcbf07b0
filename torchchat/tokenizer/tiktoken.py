"""The Llama 3 tiktoken tokenizer (base64 BPE ranks plus Meta's 256 special tokens)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from pathlib import Path

import tiktoken

from torchchat.errors import TorchchatError, one_line
from torchchat.tokenizer.base import (
    Tokenizer,
    TokenOutOfRange,
    specials_pattern,
    split_on_specials,
    stop_ids_for,
)

# Pre-tokenizer regex from Meta's llama3 tokenizer.py.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's rule: these ten, then reserved tokens numbered on from 5, 256 in all, ids after the ranks.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
)
SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)
)

# Llama 3.1+ renamed some reserved ids (same tokenizer.model); accept both spellings.
LLAMA31_NAMES = {"<|finetune_right_pad_id|>": 4, "<|eom_id|>": 8, "<|python_tag|>": 10}

# tiktoken gets very slow on huge inputs and on long runs of (non-)whitespace; Meta caps both.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


class TiktokenTokenizer(Tokenizer):
    """A Llama 3 style `tokenizer.model`: lines of `<base64 token> <rank>`."""

    kind = "tiktoken"
    strips_leading_space = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        ranks = _read_ranks(self.path)
        base = len(ranks)
        self._specials = {name: base + i for i, name in enumerate(SPECIAL_TOKENS)}
        # Names accepted in text and lookups; decoding keeps Meta's Llama 3 spellings.
        self._names = {**self._specials, **{k: base + i for k, i in LLAMA31_NAMES.items()}}
        self._specials_re = specials_pattern(self._names)
        try:
            self._enc = tiktoken.Encoding(
                name=self.path.name,
                pat_str=PAT_STR,
                mergeable_ranks=ranks,
                special_tokens=self._specials,
            )
        except ValueError as e:
            raise TorchchatError(f"cannot read tokenizer {self.path}: {one_line(e)}") from e
        self.vocab_size = self._enc.n_vocab
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.bos_id = self._specials[self.bos_token]
        self.eos_id = self._specials[self.eos_token]
        self.stop_ids = stop_ids_for(self.eos_id, self._names)

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids; without allow_special, special-token strings are encoded as plain text."""
        ids: list[int] = [self.bos_id] if bos else []
        # Splitting on specials first keeps the length caps below from cutting one in half.
        parts = split_on_specials(text, self._specials_re) if allow_special else [text]
        for part in parts:
            special = self._names.get(part) if allow_special else None
            if special is not None:
                ids.append(special)
                continue
            for start in range(0, len(part), MAX_ENCODE_CHARS):
                chunk = part[start : start + MAX_ENCODE_CHARS]
                for piece in split_long_runs(chunk, MAX_RUN_CHARS):
                    # Specials were handled above; any left in `piece` are plain text.
                    ids.extend(self._enc.encode(piece, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The token's bytes; special tokens give their own text."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenOutOfRange(token_id, self.vocab_size)
        return self._enc.decode_single_token_bytes(token_id)

    def special_strings(self) -> list[str]:
        return list(self._names)

    def special_token_id(self, text: str) -> int | None:
        """Id of a special token such as '<|eot_id|>'."""
        return self._names.get(text)


def split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut text inside runs of whitespace or non-whitespace longer than max_run.

    Same cut points as Meta's `_split_whitespaces_or_nonwhitespaces`: every max_run characters
    from the start of each over-long run.
    """
    start = 0
    # Python's \s and str.isspace agree, so these are exactly the runs Meta's loop counts. The
    # lookbehinds anchor each attempt at a run start, keeping the scan linear.
    long_run = rf"(?<!\s)\s{{{max_run + 1},}}|(?<!\S)\S{{{max_run + 1},}}"
    for run in re.finditer(long_run, text):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _read_ranks(path: Path) -> dict[bytes, int]:
    """Parse `<base64> <rank>` lines (not tiktoken's loader: it caches by path in /tmp)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TorchchatError(f"cannot read tokenizer {path}: {e.strerror or one_line(e)}") from e
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TorchchatError(
                f"cannot read tokenizer {path}: line {number} is not '<base64> <rank>'"
            ) from e
    if not ranks:
        raise TorchchatError(f"cannot read tokenizer {path}: no BPE ranks")
    return ranks
