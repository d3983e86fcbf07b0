"""GGUF's block-quantized weights on torchchat's kernels (ops_ggml.cpp): a weight is a uint8
tensor (rows, bytes a row) of a file's blocks as they are, and a ggml type id.

`linears` (decode: x quantized per block as ggml does, integer dot products), `gemm` (prefill:
decode's kernel for a few dozen tokens where the level says so, integer GEMMs where it has them,
else fp32 GEMMs on tiles dequantized just before) and `rows` (an embedding's looked-up rows)
return None where the kernels do not apply; the caller then runs the plain computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchchat import kernels

# ggml's type ids (GGUF tensor types) the kernels run: name, values a block, bytes a block.
BLOCKS = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
TYPE_IDS = {name: t for t, (name, _, _) in BLOCKS.items()}


def row_bytes(ggml_type: int, cols: int) -> int:
    _, block, size = BLOCKS[ggml_type]
    return cols // block * size


def linears(x: Tensor, weights: Sequence[Tensor], types: Sequence[int]) -> list[Tensor] | None:
    """[x @ W.T for each weight] in one call for a few rows of x (decode), or None."""
    rows = kernels._rows(x, kernels.GGML)
    if rows is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    y = torch.ops.torchchat.linear_ggml(x.reshape(rows, x.shape[-1]), weights, list(types))
    return kernels._split(x, y, weights)


def gemm(x: Tensor, weight: Tensor, ggml_type: int) -> Tensor | None:
    """x @ W.T for many rows (prefill), in x's dtype, or None."""
    if not kernels.prefill_ok(x) or not kernels.simd_level() & kernels.GGML:
        return None
    y = torch.ops.torchchat.gemm_ggml(x.reshape(-1, x.shape[-1]), weight, ggml_type)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def rows(weight: Tensor, ggml_type: int, cols: int, ids: Tensor) -> Tensor | None:
    """The rows `ids` of an embedding table, dequantized to fp32 (ids..., cols), or None."""
    if not kernels.available(kernels.GGML) or weight.device.type != "cpu":
        return None
    return torch.ops.torchchat.ggml_rows(weight, ggml_type, cols, ids)
