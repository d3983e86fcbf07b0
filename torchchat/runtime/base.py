"""The one interface every way of running a model implements (eager, compiled, exported)."""

from __future__ import annotations

import resource
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from torchchat.model.config import ModelArgs


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: str) -> float:
    """Peak memory of a model's device: CUDA's allocator, else this process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


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

    def score(self, tokens: Sequence[int]) -> Tensor:
        """fp32 logits (len(tokens), vocab) of `tokens` fed from position 0 in one call (eval's
        scoring); the KV cache then holds them, and `cached` says so for prefix reuse."""
        logits = self.forward(torch.tensor([list(tokens)], dtype=torch.long), 0)[0]
        self.cached = list(tokens)
        return logits

    def prefill(self, tokens: Tensor, start_pos: int) -> Tensor:
        """Feed a whole prompt in one call; return fp32 logits (vocab,) of its last position."""
        return self.forward(tokens, start_pos)[0, -1]

    def decode(self, token: Tensor, pos: int) -> Tensor:
        """Feed one token (1, 1) at pos; return fp32 logits (vocab,)."""
        return self.forward(token, pos)[0, -1]

    # Batched decoding (the server's): the KV cache holds `max_batch` independent sequences, one
    # per slot. The methods above use slot 0. Runtimes that cannot batch keep max_batch 1.
    max_batch: int = 1

    def setup_batch(self, max_batch: int) -> None:
        """Make room for max_batch sequences (slot 0's cache, and `cached`, are lost on a
        change). A runtime that cannot batch ignores this and keeps max_batch 1."""
        return None

    def prefill_slot(self, tokens: Tensor, start_pos: int, slot: int) -> Tensor:
        """Feed tokens (1, S) into slot's cache at positions start_pos..; fp32 logits (vocab,)
        of the last one. Slot's positions below start_pos keep what was fed there before."""
        raise NotImplementedError(f"{type(self).__name__} has no batched decoding")

    def decode_batch(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One step for every slot: tokens (max_batch, 1), row i at positions[i] of slot i ->
        fp32 logits (max_batch, vocab). A row's logits never depend on the other rows.
        positions[i] = -1 marks slot i idle: its logits are meaningless, and its cache keeps
        every position but the last (max_seq_len - 1)."""
        raise NotImplementedError(f"{type(self).__name__} has no batched decoding")

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Make positions [0, length) of slot dst hold what slot src holds there."""
        raise NotImplementedError(f"{type(self).__name__} has no batched decoding")
