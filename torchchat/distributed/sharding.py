"""Megatron-style tensor parallelism of the Transformer: which slice of each weight a rank holds.

Column-parallel (output rows split): wq, wk, wv, w1, w3 -- each rank computes whole heads (its
share of the query and key/value heads, so its KV cache holds only those) and its share of the
FFN's hidden units. Embedding, norms and output are replicated. wo and w2 (the linears that
write back to the residual stream) have two layouts:

- float models, row-parallel (input columns split): each rank's partial product over its heads
  or hidden units, summed by one all-reduce per linear.
- quantized models (`gather`), column-parallel too: the input is all-gathered, each rank
  computes its output rows over the whole input, and the rows are all-gathered. Quantized
  kernels round their output (int8/int4 to bf16) and take per-row or per-group scales, so
  only whole rows give one process's numbers exactly; partial sums rounded on each rank and
  scales of half-rows do not (greedy stories260K int8 text parted after ~60 tokens). It costs
  four all-gathers per layer instead of two all-reduces (see docs/distributed.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs
from torchchat.model.transformer import Transformer
from torchchat.quant.config import Scheme

COLUMN_PARALLEL = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "feed_forward.w1",
    "feed_forward.w3",
)
TO_RESIDUAL = ("attention.wo", "feed_forward.w2")  # row-parallel, or column-parallel if `gather`


def quantizes_linears(schemes: list[Scheme]) -> bool:
    """Whether a --quantize recipe replaces the linears (then --tp uses the gather layout)."""
    return any(s.name.startswith("linear:") for s in schemes)


@dataclass(frozen=True)
class Sharding:
    """Rank `rank` of `world`: its slice of every checkpoint tensor and the shapes they make.
    gather: split wo and w2 by output rows too (for quantized linears: exact, see above)."""

    rank: int
    world: int
    gather: bool = False

    def check(self, args: ModelArgs) -> None:
        """A one-line error when the model does not split evenly over `world` ranks."""
        sizes = [
            ("n_heads", args.n_heads),
            ("n_kv_heads", args.n_kv_heads),
            ("hidden_dim", args.hidden_dim),
        ]
        if self.gather:
            sizes.append(("dim", args.dim))
        for what, n in sizes:
            if n % self.world:
                raise TorchchatError(
                    f"--tp {self.world}: the model's {what} ({n}) is not divisible by {self.world}"
                )

    def tensor(self, name: str, t: Tensor) -> Tensor:
        """This rank's part of checkpoint tensor `name` (native name). Sliced parts are copied,
        so of a memory-mapped checkpoint only the slice is ever read; replicated ones are kept."""
        module, _, kind = name.rpartition(".")
        role = ".".join(module.split(".")[2:]) if module.startswith("layers.") else ""
        if role in COLUMN_PARALLEL or (self.gather and role in TO_RESIDUAL):
            return self._part(t, 0)
        if role in TO_RESIDUAL:
            if kind == "bias":  # added once: rank 0 holds it, the others add zeros
                return t if self.rank == 0 else torch.zeros_like(t)
            return self._part(t, 1)
        return t

    def state_dict(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """`tensor` of every entry, one at a time."""
        return {name: self.tensor(name, t) for name, t in sd.items()}

    def shrink(self, model: Transformer) -> None:
        """Make a (meta-device) model's sharded linears and head counts this rank's share, so
        its state dict has the shapes `state_dict` produces and its KV cache only local heads."""
        for layer in model.layers:
            attn = layer.attention
            attn.n_heads //= self.world
            attn.n_kv_heads //= self.world
            for role in (*COLUMN_PARALLEL, *TO_RESIDUAL):
                parent_name, _, child = role.rpartition(".")
                parent = layer.get_submodule(parent_name)
                old = getattr(parent, child)
                rows, cols = old.out_features, old.in_features
                if role in COLUMN_PARALLEL or self.gather:
                    rows //= self.world
                else:
                    cols //= self.world
                new = type(old)(cols, rows, bias=old.bias is not None, device=old.weight.device)
                setattr(parent, child, new)

    def _part(self, t: Tensor, dim: int) -> Tensor:
        size = t.shape[dim] // self.world
        return t.narrow(dim, self.rank * size, size).clone(memory_format=torch.contiguous_format)


class RowParallel(nn.Module):
    """A float linear over this rank's input columns, its partial outputs summed over all
    ranks. A functional all-reduce, so torch.compile traces it into the graph."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        if torch.compiler.is_compiling():
            return funcol.all_reduce(y, "sum", self.group)
        dist.all_reduce(y, group=self.group)  # eager: see gather_last_dim
        return y


class GatheredColumnParallel(nn.Module):
    """A linear (quantized) over this rank's output rows: the input's slices (this rank's heads
    or hidden units) are all-gathered first, the output's slices after, so every element is one
    process's whole dot product, rounded once. Functional collectives, for torch.compile."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: Tensor) -> Tensor:
        return gather_last_dim(self.linear(gather_last_dim(x, self.group)), self.group)


def gather_last_dim(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The ranks' x concatenated along the last dimension, in rank order."""
    x = x.contiguous()
    if torch.compiler.is_compiling():
        # A non-negative dim: all_gather_single gathers on dim 0, then re-concatenates on this
        # one (its shortcut for that miscounts a negative dim).
        return funcol.all_gather_single(x, x.dim() - 1, group)
    # Eager runs wait on each collective here: a functional collective's result waited on later,
    # where a kernel first touched it, crashed rank 0 in wait_tensor (SIGSEGV on gloo, 2 of ~8
    # CI runs of tests/distributed/test_torchrun.py[int8], 2026-12-07).
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def connect(model: Transformer, group: dist.ProcessGroup) -> None:
    """Wrap each layer's wo and w2 (after any quantization) in the collectives of its layout:
    `GatheredColumnParallel` when they hold output rows (their outputs are narrower than the
    residual stream), else `RowParallel`, which only a float nn.Linear may take."""
    for layer in model.layers:
        for role in TO_RESIDUAL:
            parent_name, _, child = role.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, child)
            if linear.out_features < model.args.dim:
                wrapped = GatheredColumnParallel(linear, group)
            elif isinstance(linear, nn.Linear):
                wrapped = RowParallel(linear, group)
            else:  # partial sums rounded per rank, scales of half-rows: not one process's model
                raise ValueError(
                    f"{role} is {type(linear).__name__} split by input columns: quantized "
                    "models need Sharding(gather=True)"
                )
            setattr(parent, child, wrapped)
