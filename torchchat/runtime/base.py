"""The one interface every way of running a model implements (eager, compiled, exported)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from torchchat.model.config import ModelArgs


class ModelRuntime(ABC):
    """A model with its KV cache: feed token ids at positions, get next-token logits back.

    Positions below the one being written keep whatever was fed there before, so callers may
    continue a sequence (chat turns, shared prefixes) without re-feeding it.
    """

    args: ModelArgs
    max_seq_len: int  # positions available in the KV cache
    weight_bytes: int  # bytes of weights read per decoded token (for GB/s)
    device: str

    def __init__(self) -> None:
        # Token ids held at KV positions 0, 1, ... (kept by the generator, for prefix reuse).
        self.cached: list[int] = []

    @abstractmethod
    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        """tokens (1, S) at positions start_pos.. -> fp32 logits (1, S, vocab)."""

    def prefill(self, tokens: Tensor, start_pos: int) -> Tensor:
        """Feed a whole prompt in one call; return fp32 logits (vocab,) of its last position."""
        return self.forward(tokens, start_pos)[0, -1]

    def decode(self, token: Tensor, pos: int) -> Tensor:
        """Feed one token (1, 1) at pos; return fp32 logits (vocab,)."""
        return self.forward(token, pos)[0, -1]
