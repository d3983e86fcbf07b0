"""Rank 0 runs the verb (generate, chat, bench, server) against `TensorParallelRuntime`; every
other rank runs `follow`, repeating each forward call rank 0 broadcasts, so the all-reduces
inside the model meet. Sampling, tokenizing and all input and output stay on rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from torchchat.distributed.group import (
    DECODE,
    FORWARD,
    PREFILL,
    REPORT_MEMORY,
    SETUP,
    STOP,
    TensorParallelGroup,
)
from torchchat.distributed.sharding import connect
from torchchat.model.transformer import Transformer
from torchchat.runtime.base import ModelRuntime
from torchchat.runtime.eager import EagerRuntime


class TensorParallelRuntime(ModelRuntime):
    """Rank 0's share of a sharded model: each call is sent to the other ranks, then run here.
    The KV cache length and torch thread count are sent first, so every rank builds the same."""

    def __init__(
        self,
        model: Transformer,
        max_seq_len: int,
        group: TensorParallelGroup,
        *,
        compile: bool = False,
        compile_prefill: bool = False,
    ):
        super().__init__()
        if group.rank != 0:
            raise ValueError("ranks > 0 run `follow`, not a TensorParallelRuntime")
        self.group = group
        group.send(SETUP, max_seq_len, torch.get_num_threads())
        self.local = _local_runtime(model, max_seq_len, compile, compile_prefill)
        self.args, self.max_seq_len = self.local.args, max_seq_len
        self.device, self.weight_bytes = self.local.device, self.local.weight_bytes  # this rank's

    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        self.group.send(FORWARD, start_pos, tokens=tokens)
        return self.local.forward(tokens, start_pos)

    def prefill(self, tokens: Tensor, start_pos: int) -> Tensor:
        self.group.send(PREFILL, start_pos, tokens=tokens)
        return self.local.prefill(tokens, start_pos)

    def decode(self, token: Tensor, pos: int) -> Tensor:
        self.group.send(DECODE, pos, tokens=token)
        return self.local.decode(token, pos)

    def peak_rss_per_rank(self) -> list[float]:
        """Peak resident memory (MB) of every rank, rank 0 first."""
        self.group.send(REPORT_MEMORY)
        return self.group.gather_peak_rss()


def follow(
    model: Transformer,
    group: TensorParallelGroup,
    *,
    compile: bool = False,
    compile_prefill: bool = False,
) -> None:
    """Ranks > 0: run rank 0's calls on this rank's share of the model until it says stop."""
    op, max_seq_len, threads, _ = group.receive()
    if op == STOP:  # rank 0 failed before it had a model to run
        return
    if op != SETUP:
        raise RuntimeError(f"tensor-parallel protocol: expected SETUP, got op {op}")
    torch.set_num_threads(threads)
    local = _local_runtime(model, max_seq_len, compile, compile_prefill)
    calls = {FORWARD: local.forward, PREFILL: local.prefill, DECODE: local.decode}
    while True:
        op, pos, _, tokens = group.receive()
        if op == STOP:
            return
        if op == REPORT_MEMORY:
            group.gather_peak_rss()
        elif op in calls:
            calls[op](tokens, pos)
        else:
            raise RuntimeError(f"tensor-parallel protocol: unknown op {op}")


def _local_runtime(
    model: Transformer,
    max_seq_len: int,
    compile: bool,
    compile_prefill: bool,
) -> EagerRuntime:
    if model.layers and model.layers[0].attention.n_heads == model.args.n_heads:
        raise ValueError("tensor parallelism needs a model built with a Sharding")
    connect(model, dist.group.WORLD)
    return EagerRuntime(model, max_seq_len, compile=compile, compile_prefill=compile_prefill)
