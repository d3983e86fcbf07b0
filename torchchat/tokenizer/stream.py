"""Incremental detokenization for streaming generated text."""

from __future__ import annotations

import codecs

from torchchat.tokenizer.base import Tokenizer


class StreamDecoder:
    """Turns token ids, one at a time, into text without ever splitting a UTF-8 character.

    Concatenating every `push` result and the final `flush` gives the same text as
    `tokenizer.decode(ids)` when the stream starts a sequence (prev_token None or BOS).
    Callers should not push tokens from `tokenizer.stop_ids`: stop on them instead, since
    tiktoken would otherwise print them as text (e.g. "<|eot_id|>").
    """

    def __init__(self, tokenizer: Tokenizer, prev_token: int | None = None) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Like llama2.c's run.c: sentencepiece drops the dummy-prefix space only at sequence start.
        self._strip_space = tokenizer.strips_leading_space and (
            prev_token is None or prev_token == tokenizer.bos_id
        )

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be "" mid-character)."""
        data = self._tokenizer.token_bytes(token_id)
        if self._strip_space and data:
            self._strip_space = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Return whatever is pending (an incomplete character becomes U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
