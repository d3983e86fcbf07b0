"""The tokenizer file the C++ runners (runner/) read, written by `torchchat tokenizer-export`."""

from __future__ import annotations

import base64
import struct

from torchchat.errors import TorchchatError
from torchchat.tokenizer.base import Tokenizer


def runner_tokenizer_bytes(tok: Tokenizer) -> bytes:
    """llama2.c's tokenizer.bin for sentencepiece (byte-identical to llama2.c's tokenizer.py
    output), the `<base64> <rank>` file for tiktoken."""
    if tok.kind == "sentencepiece":
        pieces = []
        for i in range(tok.vocab_size):
            piece, score = tok.piece(i)
            text = {tok.bos_id: "\n<s>\n", tok.eos_id: "\n</s>\n"}.get(i, piece)
            pieces.append((score, text.replace("\u2581", " ").encode()))
        out = [struct.pack("<i", max(len(b) for _, b in pieces))]
        out += [struct.pack("<fi", score, len(b)) + b for score, b in pieces]
        return b"".join(out)
    if tok.kind == "tiktoken":
        # The ranks are the ids below the first special token (the runner re-adds the 256).
        n_ranks = tok.special_token_id("<|begin_of_text|>")
        return b"".join(base64.b64encode(tok.token_bytes(i)) + b" %d\n" % i for i in range(n_ranks))
    raise TorchchatError(
        f"the C++ runners read sentencepiece and tiktoken tokenizers, not {tok.kind}"
    )
