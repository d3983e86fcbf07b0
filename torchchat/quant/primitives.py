"""Round-to-nearest quantizers: float weights -> integer codes + scales (+ zeros). Pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = torch.finfo(torch.float32).eps


def pad_to(w: Tensor, multiple: int, dim: int = -1) -> Tensor:
    """Zero-pad `dim` of w up to a multiple (no copy when already aligned)."""
    size = w.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return w
    pad = [0, 0] * (w.dim() - 1 - (dim % w.dim())) + [0, extra]
    return F.pad(w, pad)


# Rows a quantizer takes at once: ~4 MB of them as fp32. Its temporaries (an fp32 copy,
# differences, rounded values) are then a few of those; of a whole matrix they were ~2x it in
# fp32 (TinyLlama's 32000 x 2048 output layer: ~0.5 GB; Llama 3's 128256 x 4096: ~4 GB).
ROWS_BYTES = 4 << 20


def by_rows(fn, w: Tensor, *args):
    """fn(w, *args) -- a quantizer whose outputs' rows are w's -- over blocks of w's rows, the
    outputs concatenated: the same values, temporaries of a block."""
    step = max(1, ROWS_BYTES // (4 * max(1, w[0].numel())))
    if w.shape[0] <= step:
        return fn(w, *args)
    parts = [fn(w[i : i + step], *args) for i in range(0, w.shape[0], step)]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def quantize_symmetric(w: Tensor, bits: int, groupsize: int) -> tuple[Tensor, Tensor]:
    """Signed codes in [-2^(b-1), 2^(b-1)-1] and per-row (groupsize 0) or per-group scales.

    Returns int8 codes shaped like w and fp32 scales (rows,) or (rows, cols // groupsize).
    Columns must already be a multiple of groupsize.
    """
    return by_rows(_quantize_symmetric, w, bits, groupsize)


def _quantize_symmetric(w: Tensor, bits: int, groupsize: int) -> tuple[Tensor, Tensor]:
    qmax = 2 ** (bits - 1) - 1
    wf = w.float()
    groups = wf.reshape(wf.shape[0], -1, groupsize) if groupsize else wf.unsqueeze(1)
    scales = (groups.abs().amax(dim=-1) / qmax).clamp(min=EPS)
    q = torch.clamp(torch.round(groups / scales.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
    return q.reshape(w.shape), scales if groupsize else scales.squeeze(1)


def quantize_int4_asymmetric(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor, Tensor]:
    """Unsigned 4-bit codes with per-group scale and float zero: w ~ (q - 8) * scale + zero."""
    return by_rows(_quantize_int4_asymmetric, w, groupsize)


def _quantize_int4_asymmetric(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor, Tensor]:
    groups = w.float().reshape(w.shape[0], -1, groupsize)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=EPS)
    q = torch.clamp(torch.round((groups - lo.unsqueeze(-1)) / scales.unsqueeze(-1)), 0, 15)
    zeros = lo + scales * 8
    return q.to(torch.uint8).reshape(w.shape), scales, zeros


def dequantize_groups(
    q: Tensor, scales: Tensor, zeros: Tensor | None = None, offset: int = 0
) -> Tensor:
    """(q - offset) * scale (+ zero) with per-row or per-group scales, in fp32."""
    rows, cols = q.shape
    s = scales.float().reshape(rows, -1, 1)
    out = (q.float().reshape(rows, s.shape[1], -1) - offset) * s
    if zeros is not None:
        out = out + zeros.float().reshape(rows, -1, 1)
    return out.reshape(rows, cols)


def pack_int4(q: Tensor) -> Tensor:
    """Two unsigned 4-bit codes per byte, the even column in the high nibble (ExecuTorch order)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4."""
    # floor-divide/remainder rather than shifts: they are core ATen ops, so this exports to
    # ExecuTorch as is.
    high = torch.div(packed, 16, rounding_mode="floor")
    return torch.stack([high, packed - high * 16], dim=-1).reshape(packed.shape[0], -1)


def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Activations -> int8 per token, asymmetric, as 8da4w defines it: (codes as fp32, scale,
    zero point), the last two (..., 1); x ~ (codes - zero) * scale."""
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=EPS)
    zero = torch.clamp(-128 - torch.round(lo / scale), -128, 127)
    q = torch.clamp(torch.round(xf / scale) + zero, -128, 127)
    return q, scale, zero


def quantize_activations_per_token(x: Tensor) -> Tensor:
    """Fake-quantize activations to int8 per token, asymmetric (what 8da4w runs on device)."""
    q, scale, zero = quantize_per_token_int8(x)
    return ((q - zero) * scale).to(x.dtype)
