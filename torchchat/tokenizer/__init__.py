"""Tokenizers: load one from a file or folder, detecting its format from the content."""

from __future__ import annotations

import re
from pathlib import Path

from torchchat.errors import TorchchatError, one_line
from torchchat.tokenizer.base import Tokenizer
from torchchat.tokenizer.hf import HFTokenizer
from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer
from torchchat.tokenizer.stream import StreamDecoder
from torchchat.tokenizer.tiktoken import TiktokenTokenizer

__all__ = [
    "HFTokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "TiktokenTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_file",
]

# First line of a tiktoken BPE file: "<base64 token> <rank>".
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer.json, tiktoken BPE file or sentencepiece model (or a folder holding one)."""
    found = tokenizer_file(path)
    if found is None:
        raise TorchchatError(
            f"tokenizer not found in {path}: expected tokenizer.json or tokenizer.model "
            "(pass --tokenizer-path)"
        )
    path = found
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise TorchchatError(f"cannot read tokenizer {path}: {e.strerror or one_line(e)}") from e

    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    if _TIKTOKEN_LINE.fullmatch(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except TorchchatError as e:
        # Anything unrecognised ends up here, so name all three formats, not protobuf internals.
        raise TorchchatError(
            f"cannot read tokenizer {path}: not a tokenizer.json, tiktoken BPE file "
            "or sentencepiece model"
        ) from e


def tokenizer_file(path: str | Path) -> Path | None:
    """The tokenizer file `path` names: itself, or the one in a folder (None if it has none)."""
    path = Path(path)
    if not path.exists():
        raise TorchchatError(f"tokenizer not found: {path} (pass --tokenizer-path)")
    if not path.is_dir():
        return path
    # tokenizer.json first: HF folders often also ship a sentencepiece tokenizer.model.
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            return path / name
    models = sorted(p for p in path.glob("*.model") if p.is_file())
    if len(models) <= 1:
        return models[0] if models else None
    names = ", ".join(p.name for p in models)
    raise TorchchatError(f"several tokenizers in {path} ({names}); pass --tokenizer-path FILE")
