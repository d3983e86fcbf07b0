"""Linears and the token embedding of a GGUF file kept in the file's own block encoding.

Each weight is a uint8 buffer (rows, bytes a row) holding ggml's blocks as the file stores them
(a view of the memory-mapped file when loaded from one) and the ggml type id that says how to
read them. The plain forward here dequantizes with the `gguf` package's reference code (bit-equal
to ggml's) and multiplies in floats: correct anywhere, slow; the runtime swaps in classes that run
torchchat's kernels on the blocks (torchchat/runtime/kernel_modules.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchchat.kernels.ggml import BLOCKS, row_bytes


def type_name(ggml_type: int) -> str:
    return BLOCKS[ggml_type][0]


def dequantize_rows(weight: Tensor, ggml_type: int, cols: int) -> Tensor:
    """fp32 (rows, cols) of a (rows, bytes) uint8 tensor of `ggml_type` blocks."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    data = weight.detach().cpu().numpy()
    with np.errstate(all="ignore"):  # a file's inf/NaN scales are its values
        values = dequantize(data, GGMLQuantizationType(ggml_type))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(-1, cols))


class GGUFLinear(nn.Module):
    """y = x @ W.T (+ bias) with W in a GGUF's blocks of ggml type `ggml_type`."""

    def __init__(
        self, in_features: int, out_features: int, ggml_type: int, bias: bool = False, device=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, ggml_type
        shape = (out_features, row_bytes(ggml_type, in_features))
        self.register_buffer("weight", torch.empty(shape, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def dequantize(self) -> Tensor:
        """The float weight (out, in) the blocks encode."""
        return dequantize_rows(self.weight, self.ggml_type, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantize().to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        kind = type_name(self.ggml_type)
        return f"in_features={self.in_features}, out_features={self.out_features}, type={kind}"


class GGUFEmbedding(nn.Module):
    """A token table in a GGUF's blocks: only the looked-up rows are dequantized. The output
    dtype is the model's: .to(dtype) and the like set it as they cast float tensors."""

    def __init__(self, num: int, dim: int, ggml_type: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num, self.dim, self.ggml_type, self.dtype = num, dim, ggml_type, dtype
        shape = (num, row_bytes(ggml_type, dim))
        self.register_buffer("weight", torch.empty(shape, dtype=torch.uint8, device=device))

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def rows(self, ids: Tensor) -> Tensor:
        """fp32 (ids..., dim)."""
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, return_inverse=True)
        table = dequantize_rows(self.weight[unique.cpu()], self.ggml_type, self.dim)
        return table.to(ids.device)[inverse].reshape(*ids.shape, self.dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows(ids).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num}, {self.dim}, type={type_name(self.ggml_type)}"


def use_gguf_blocks(model: nn.Module, types: dict[str, int]) -> None:
    """Swap in GGUF modules (empty, for load_state_dict to fill) for the weights named in
    `types` (native weight name -> ggml type id): the token table or a linear."""
    for name, ggml_type in types.items():
        parent_name, _, child = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if isinstance(old, nn.Embedding):
            new = GGUFEmbedding(old.num_embeddings, old.embedding_dim, ggml_type, old.weight.dtype)
        else:
            new = GGUFLinear(old.in_features, old.out_features, ggml_type, old.bias is not None)
        setattr(parent, child, new)
