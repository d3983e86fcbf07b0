"""Quantized token embedding: int8 or packed int4 rows, dequantized only for the looked-up ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchchat.quant.primitives import pack_int4, pad_to, quantize_symmetric, unpack_int4


class QuantizedEmbedding(nn.Module):
    """bitwidth 8: int8 codes; bitwidth 4: two codes per byte. Scales per row or per group."""

    def __init__(
        self, num: int, dim: int, bitwidth: int, groupsize: int, dtype=torch.float32, device=None
    ):
        """Output dtype follows the scales, which follow the model's dtype through .to()."""
        super().__init__()
        self.num, self.dim, self.bitwidth, self.groupsize = num, dim, bitwidth, groupsize
        cols = dim + (-dim) % (groupsize or 2)
        shape = (num, cols) if bitwidth == 8 else (num, cols // 2)
        self.register_buffer(
            "weight",
            torch.zeros(shape, dtype=torch.int8 if bitwidth == 8 else torch.uint8, device=device),
        )
        scale_shape = (num, cols // groupsize) if groupsize else (num,)
        self.register_buffer("scales", torch.ones(scale_shape, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, emb: nn.Embedding, bitwidth: int, groupsize: int) -> QuantizedEmbedding:
        w = emb.weight.detach()
        m = cls(w.shape[0], w.shape[1], bitwidth, groupsize, w.dtype, w.device)
        q, s = quantize_symmetric(pad_to(w, groupsize or 2), bitwidth, groupsize)
        m.weight = q if bitwidth == 8 else pack_int4((q.to(torch.int16) + 8).to(torch.uint8))
        m.scales = s.to(w.dtype)
        return m

    def dequantize(self) -> Tensor:
        """The float table (num, dim)."""
        return self(torch.arange(self.num, device=self.weight.device)).float()

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight)  # (..., cols) codes of just these tokens
        if self.bitwidth == 4:
            rows = unpack_int4(rows.reshape(-1, rows.shape[-1])).to(torch.int8) - 8
            rows = rows.reshape(*ids.shape, -1)
        s = F.embedding(ids, self.scales.reshape(self.num, -1))
        groups = rows.float().reshape(*ids.shape, s.shape[-1], -1) * s.float().unsqueeze(-1)
        return groups.reshape(*ids.shape, -1)[..., : self.dim].to(self.scales.dtype)
