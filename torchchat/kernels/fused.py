"""The fused one-token decode step (`torchchat::decode_layers`): one kernel call runs every layer
of a one-token step of one sequence (or, `torchchat::decode_layers_paged`, of a few sequences in
a paged pool) -- RMSNorm, q/k/v, RoPE, cache write, attention, wo and
residual, RMSNorm, w1/w3, SiLU gate, w2 and residual -- rounded where the modules round.

What it runs on is described here with types: each linear says what it gives the step
(`FusedLinear`), and a `DecodePlan` gathers a model's tensors once. Which linears can give what
is the runtime's business (torchchat/runtime/kernel_modules.py); this module knows no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from torchchat import kernels


class WeightKind(IntEnum):
    """The kinds of linear weights the step runs on (cpu_linear.cpp's WeightKind)."""

    FLOAT = kernels.FLOAT_WEIGHTS  # weights of the activation dtype
    INT8 = kernels.INT8_WEIGHTS  # int8 codes, per-row or power-of-two group scales
    INT4 = kernels.INT4_WEIGHTS  # torch's CPU int4 pack layout, asymmetric groups
    INT4_INT8_ACTIVATIONS = kernels.INT4_WEIGHTS_INT8_ACTIVATIONS  # 8da4w
    GGML = kernels.GGML_WEIGHTS  # a GGUF's blocks, each linear of its own ggml type


@dataclass(frozen=True)
class FusedLinear:
    """What one linear gives the step: its weight and scales (None for float weights; int4's
    laid out by `kernels.int4_blocked_scales`) and the kind and group size that must be the same
    for every linear of a model."""

    kind: WeightKind
    groupsize: int
    weight: Tensor
    scales: Tensor | None = None
    ggml_type: int = 0  # GGML: the weight's own type (linears of a model may differ)

    @property
    def key(self) -> tuple:
        """What all of a model's linears must share: kind, group size and scales dtype."""
        return self.kind, self.groupsize, None if self.scales is None else self.scales.dtype


@dataclass
class DecodePlan:
    """The tensors the step takes for a model, gathered once: per layer its two norm weights,
    its caches and its 7 linears (wq, wk, wv, wo, w1, w3, w2)."""

    norms: list[Tensor]
    k_caches: list[Tensor]
    v_caches: list[Tensor]
    linears: list[FusedLinear]
    eps: float
    n_heads: int

    def __post_init__(self) -> None:  # the kernel's argument lists, made once
        self.weights = [f.weight for f in self.linears]
        self.scales = [f.scales for f in self.linears if f.scales is not None]
        self.types = [f.ggml_type for f in self.linears] if self.kind == WeightKind.GGML else []

    @property
    def kind(self) -> WeightKind:
        return self.linears[0].kind

    def needs(self) -> int:
        """The level bit (kernels.FEW_ROWS, INT4) the step needs for these weights."""
        return kernels.decode_layers_needs(self.kind)


def decode_step(
    plan: DecodePlan, x: Tensor, freqs: Tensor, mask: Tensor, pos: Tensor
) -> Tensor | None:
    """The embedding x (1, 1, dim) of one token at position `pos` (1,) through every layer of
    `plan` (the caches written in place), or None when the kernels are off. `freqs` and `mask`
    are the model's RoPE table (fp32) and causal mask."""
    return kernels.decode_layers(
        x, plan.norms, plan.eps, freqs, mask, pos, plan.k_caches, plan.v_caches, plan.weights,
        plan.scales, int(plan.kind), plan.linears[0].groupsize, plan.n_heads, plan.types,
    )  # fmt: skip


def decode_step_paged(
    plan: DecodePlan,
    x: Tensor,
    freqs: Tensor,
    pos: Tensor,
    index: Tensor,
    k_pools: list[Tensor],
    v_pools: list[Tensor],
) -> Tensor | None:
    """The embeddings x (M, dim) of one token of each of M <= STEP_ROWS sequences through every
    layer of `plan`, their keys and values in paged pools (`kernels.decode_layers_paged`: pos
    (M,) their positions, index (M, T) the pool rows of their positions), or None when the
    kernels are off. The plan's own caches are not touched."""
    return kernels.decode_layers_paged(
        x, plan.norms, plan.eps, freqs, pos, index, k_pools, v_pools, plan.weights, plan.scales,
        int(plan.kind), plan.linears[0].groupsize, plan.n_heads, plan.types,
    )  # fmt: skip


def takes(x: Tensor, pos: Tensor, freqs: Tensor) -> bool:
    """Whether a step's inputs are what the fused kernel takes: one token, a long position,
    an fp32 RoPE table, no autograd, not being traced by torch.compile."""
    return (
        x.shape[:2] == (1, 1)
        and pos.shape == (1,)
        and pos.dtype == torch.long
        and freqs.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )
