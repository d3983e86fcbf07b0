"""Quantized replacements for nn.Linear, each running a real low-bit kernel.

Weights live in plain buffers (no tensor subclasses) so quantized checkpoints load with
torch.load(weights_only=True) and modules export with torch.export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchchat.quant.primitives import (
    dequantize_groups,
    pad_to,
    quantize_activations_per_token,
    quantize_int4_asymmetric,
    quantize_symmetric,
)


def kernel_dtype(x: Tensor) -> torch.dtype:
    """Low-bit kernels run on 16-bit activations; fp32 models feed them bf16 (fp32 paths are slow)."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


class Int8Linear(nn.Module):
    """int8 weights, per-channel (groupsize 0: `_weight_int8pack_mm`) or per-group scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groupsize: int = 0,
        bias: bool = False,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        # The per-channel kernel reads columns 16 at a time (other widths crash or read garbage).
        cols = in_features + (-in_features) % (groupsize or 16)
        scale_shape = (out_features, cols // groupsize) if groupsize else (out_features,)
        self.register_buffer(
            "weight", torch.zeros(out_features, cols, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(scale_shape, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, groupsize: int) -> Int8Linear:
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], groupsize, linear.bias is not None, device=w.device)
        q, s = quantize_symmetric(pad_to(w, groupsize or 16), 8, groupsize)
        m.weight.copy_(q)
        m.scales = s.to(torch.bfloat16)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    @classmethod
    def from_codes(
        cls, codes: Tensor, scales: Tensor, groupsize: int, bias: Tensor | None = None
    ) -> Int8Linear:
        """From int8 codes (out, in) and per-group scales (out, in // groupsize)."""
        m = cls(codes.shape[1], codes.shape[0], groupsize, bias is not None, device=codes.device)
        m.weight.copy_(pad_to(codes, groupsize))
        m.scales = scales.to(torch.bfloat16)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone())
        return m

    def dequantize(self) -> Tensor:
        """The float weight (out, in) this module multiplies by."""
        scales = self.scales.float() if self.groupsize else self.scales.float()[:, None]
        return dequantize_groups(self.weight, scales)[:, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        dt = kernel_dtype(x)
        if self.groupsize == 0:
            x2 = F.pad(
                x.to(dt).reshape(-1, x.shape[-1]), (0, self.weight.shape[1] - self.in_features)
            )
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(dt))
            y = y.reshape(*x.shape[:-1], -1)
        else:  # no fused groupwise int8 kernel: dequantize (torch.compile fuses this into the matmul)
            w = dequantize_groups(self.weight, self.scales).to(dt)[:, : self.in_features]
            y = F.linear(x.to(dt), w)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """int4 groupwise weights in the device's packed layout (`_weight_int4pack_mm*`; on CPU
    torchchat's, `pack_int4_cpu`).

    symmetric=False: asymmetric codes with a float zero per group (linear:int4, GPTQ).
    symmetric=True with dynamic int8 activations: 8da4w (zeros fixed at 0).
    The kernel needs output rows in multiples of 16 and input columns in multiples of the group
    size, so both are zero-padded and the padding sliced off.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groupsize: int,
        bias: bool = False,
        dynamic_activations: bool = False,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.dynamic_activations = dynamic_activations
        self.k = in_features + (-in_features) % groupsize
        self.n = out_features + (-out_features) % 16
        # Saved checkpoints (and meta-device skeletons) use the CPU kernel's layout.
        gpu = device is not None and torch.device(device).type in ("cuda", "mps")
        if not gpu:
            aten_packs_as_torchchat()  # known before any tracing reads it
        packed_shape = _gpu_packed_shape(self.n, self.k) if gpu else (self.n, self.k // 2)
        packed_dtype = torch.int32 if gpu else torch.uint8
        self.register_buffer("weight", torch.zeros(packed_shape, dtype=packed_dtype, device=device))
        self.register_buffer(
            "scales_and_zeros",
            torch.zeros(self.k // groupsize, self.n, 2, dtype=torch.bfloat16, device=device),
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor,
        in_features: int,
        groupsize: int,
        bias: Tensor | None = None,
        dynamic_activations: bool = False,
    ) -> Int4Linear:
        """From unsigned codes (out, k) in [0, 15], scales and zeros (out, k // groupsize)."""
        out_features = codes.shape[0]
        m = cls(
            in_features,
            out_features,
            groupsize,
            bias is not None,
            dynamic_activations,
            codes.device,
        )
        # uint8, not int32 (4x the bytes: 0.5 GB for a 32000 x 4096 output layer)
        codes = F.pad(codes.to(torch.uint8), (0, 0, 0, m.n - out_features))
        m.weight = pack_for_device(codes)
        sz = torch.stack([scales, zeros], dim=-1).float()  # (out, groups, 2)
        sz = F.pad(sz, (0, 0, 0, 0, 0, m.n - out_features))
        m.scales_and_zeros = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone())
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, groupsize: int) -> Int4Linear:
        w = pad_to(linear.weight.detach(), groupsize)
        codes, scales, zeros = quantize_int4_asymmetric(w, groupsize)
        return cls.from_codes(codes, scales, zeros, linear.in_features, groupsize, linear.bias)

    @classmethod
    def from_float_8da4w(cls, linear: nn.Linear, groupsize: int) -> Int4Linear:
        w = pad_to(linear.weight.detach(), groupsize)
        q, scales = quantize_symmetric(w, 4, groupsize)
        codes = (q + 8).to(torch.uint8)  # -8..7 + 8 fits int8
        return cls.from_codes(
            codes,
            scales,
            torch.zeros_like(scales),
            linear.in_features,
            groupsize,
            linear.bias,
            True,
        )

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but scales and zeros made in bf16 stay bf16 when the model is cast to
        another float dtype: every kernel reads them so (the forward casts them for aten's), an
        fp32 copy took half the codes' bytes again, and torchchat's CPU kernels, which take bf16
        only, left such a model's prefill to aten's kernel and its repacked copy of the codes
        (TinyLlama int4 g32 in fp32 on an AVX2 CPU: peak RSS 2.0 -> 1.2 GB, time to first token
        4.1 -> 0.09 s). Scales that are not bf16 values (a checkpoint's fp32 ones) stay as they are."""
        super()._apply(fn, recurse)
        sz = self.scales_and_zeros
        if sz.is_floating_point() and sz.dtype != torch.bfloat16 and sz.device.type != "meta":
            b = sz.to(torch.bfloat16)
            if torch.equal(b.to(sz.dtype), sz):
                self.scales_and_zeros = b
        return self

    def dequantize(self) -> Tensor:
        """The float weight (out, in): (code - 8) * scale + zero in fp32 (on CUDA/MPS read back
        through the kernel itself, an fp32 identity input)."""
        sz = self.scales_and_zeros.float()
        if self.weight.device.type == "cpu":
            codes = unpack_int4_cpu(self.weight).float().reshape(self.n, -1, self.groupsize)
            scale, zero = sz.transpose(0, 1).unsqueeze(-1).unbind(-2)  # (n, groups, 1) each
            w = ((codes - 8) * scale + zero).reshape(self.n, self.k)
            return w[: self.out_features, : self.in_features]
        eye = torch.eye(self.k, device=self.weight.device)
        wt = torch.ops.aten._weight_int4pack_mm(eye, self.weight, self.groupsize, sz)
        return wt.T[: self.out_features, : self.in_features]

    def aten_weight(self) -> Tensor:
        """The CPU weight in the layout this machine's aten kernel reads: the buffer itself, or
        one repacked by aten -- in traced code (torch.compile, export) as part of the graph,
        eagerly once per weight tensor, kept beside it."""
        if _aten_same:
            return self.weight
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            made = self.__dict__.get("_aten_weight")  # prepare_aten_int4's, made before tracing
            if made is not None:
                return made
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_int4_cpu(self.weight), 1
            )
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_aten_key", None) != key:
            codes = unpack_int4_cpu(self.weight)
            self._aten_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self._aten_key = key
        return self._aten_weight

    def forward(self, x: Tensor) -> Tensor:
        xq = quantize_activations_per_token(x) if self.dynamic_activations else x
        dt = kernel_dtype(x)
        x2 = F.pad(xq.reshape(-1, x.shape[-1]).to(dt), (0, self.k - self.in_features))
        sz = self.scales_and_zeros.to(dt)
        if self.weight.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.aten_weight(), self.groupsize, sz
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.groupsize, sz)
        y = y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def pack_for_device(codes: Tensor) -> Tensor:
    """Integer codes (n, k) in [0, 15] -> the packed layout the device's int4 matmul reads (on
    CPU torchchat's, `pack_int4_cpu`)."""
    if codes.device.type == "cpu":
        return pack_int4_cpu(codes)
    nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # cuda/mps take uint8 pairs
    return torch.ops.aten._convert_weight_to_int4pack(nibbles, 8)


# torchchat's CPU int4 layout is torch's from a CPU with AVX-512, on every machine: aten's
# _convert_weight_to_int4pack_for_cpu packs for the CPU it runs on (blocks of 64 rows with
# AVX-512, 32 with AVX2, byte pairs without either), so a checkpoint packed there would read as
# other weights elsewhere. torchchat's kernels (cpu/avx2/int4.cpp gives the layout) and saved
# checkpoints use this one; aten's kernel gets a copy in its own layout where that differs.
def pack_int4_cpu(codes: Tensor) -> Tensor:
    """int codes (n, k) in [0, 15], n a multiple of 16 and k even -> (n, k / 2) uint8: rows in
    blocks of 64, each stored k-major, 32 bytes a k whose low nibbles are the block's rows 0-31
    and high nibbles rows 32-63; a last block of fewer rows (16, 32 or 48) stores rows 2d (low)
    and 2d + 1 (high) in byte d of each k."""
    n, k = codes.shape
    c = codes.to(torch.uint8)
    full = n // 64 * 64
    blocks = c[:full].reshape(-1, 64, k)
    body = (blocks[:, :32] | blocks[:, 32:] << 4).transpose(1, 2)  # (blocks, k, 32)
    tail = (c[full::2] | c[full + 1 :: 2] << 4).T  # (k, rows / 2)
    return torch.cat([body.reshape(-1), tail.reshape(-1)]).reshape(n, k // 2)


def unpack_int4_cpu(packed: Tensor) -> Tensor:
    """The inverse of pack_int4_cpu: (n, k / 2) uint8 -> int32 codes (n, k)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    flat = packed.reshape(-1)
    full = n // 64 * 64
    body = flat[: full * k // 2].reshape(-1, k, 32).transpose(1, 2)  # (blocks, 32, k)
    rows = torch.cat([body & 15, body >> 4], dim=1).reshape(full, k)
    tail = flat[full * k // 2 :].reshape(k, -1).T  # (rows / 2, k)
    pairs = torch.stack([tail & 15, tail >> 4], dim=1).reshape(-1, k)
    return torch.cat([rows, pairs]).to(torch.int32)


_aten_same: bool | None = None


def prepare_aten_int4(model: nn.Module) -> None:
    """Make every CPU Int4Linear's copy for aten's kernel now, before torch.compile or export
    trace the model (they then hold it as a constant), where this machine's aten packs int4 in
    another layout than torchchat's; nothing elsewhere."""
    for m in model.modules():
        if isinstance(m, Int4Linear) and m.weight.device.type == "cpu":
            m.aten_weight()


def aten_packs_as_torchchat() -> bool:
    """Whether this machine's aten int4 CPU kernel reads torchchat's layout (it reads the one
    its own packing op writes, which depends on the CPU: see pack_int4_cpu). Found once, by
    packing a probe; Int4Linear asks at construction, so traced code only reads the answer."""
    global _aten_same
    if _aten_same is None:
        # on the CPU whatever the default device: models are built on the meta device
        probe = torch.arange(64 * 32, dtype=torch.int32, device="cpu").reshape(64, 32) * 7 % 16
        aten = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        _aten_same = torch.equal(aten.reshape(-1), pack_int4_cpu(probe).reshape(-1))
    return _aten_same


def _gpu_packed_shape(n: int, k: int) -> tuple[int, ...]:
    inner_k_tiles = 8
    return (n // 8, k // (inner_k_tiles * 16), 32, inner_k_tiles // 2)
