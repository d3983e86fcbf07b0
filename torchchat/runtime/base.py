"""The one interface every way of running a model implements (eager, compiled, exported)."""

from __future__ import annotations

import resource
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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

    # Paged batching (the server's): the keys/values of many sequences live in a pool of
    # fixed-size blocks, and one `step` feeds each sequence its own new tokens. The methods above
    # use the runtime's one-sequence cache, which paged steps leave alone.
    block_size: int = 0  # positions per block; 0 until `setup_paged` (or if it cannot page)

    @property
    def step_rows(self) -> int | None:
        """Tokens a paged step computes at a time, each time reading all the weights (the
        scheduler sizes prompt chunks by it while others decode), or None: a step reads them
        once however many tokens it has."""
        return None

    def setup_paged(self, block_size: int, max_blocks: int) -> bool:
        """Make an empty paged KV cache of `block_size`-position blocks, at most `max_blocks`
        (grown by `reserve_blocks`). False, and nothing changes, for a runtime that cannot
        page: it serves one sequence at a time."""
        return False

    def reserve_blocks(self, blocks: int) -> None:
        """Make the pool hold blocks 0..blocks-1, keeping what they hold."""
        raise NotImplementedError(f"{type(self).__name__} has no paged KV cache")

    def step(self, chunks: Sequence[SeqChunk]) -> Tensor:
        """Feed each chunk's tokens into its sequence's blocks; fp32 logits (len(chunks), vocab)
        of each chunk's last token. A sequence's logits do not depend on which others share the
        step, up to float rounding when the step's row count changes the kernels' tiling."""
        raise NotImplementedError(f"{type(self).__name__} has no paged KV cache")

    def copy_blocks(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """For each (src, dst, n): the keys/values of block src's first n positions into block
        dst (a sequence's own block that begins as a cached one does)."""
        raise NotImplementedError(f"{type(self).__name__} has no paged KV cache")

    def kv_cache_bytes(self) -> int:
        """Bytes the KV caches hold (the one-sequence cache and the paged pool)."""
        return 0


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a paged step: `tokens` fed at positions start.., its keys and
    values in `blocks` (position p in block blocks[p // block_size]); `seq` names the sequence
    from step to step (a runtime may keep state for it)."""

    seq: int
    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]
