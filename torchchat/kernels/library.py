"""Loading torchchat's CPU kernels and choosing their instruction-set level.

`pip install` builds them (setup.py) into torchchat/kernels/_C*.so: ops.cpp's torch custom ops
over the core in cpu/ (cpu/common: scalar reference kernels, portable drivers, the decode step;
cpu/<isa>: one folder per instruction set). Loading picks one table of kernels for the process:
the fastest level this CPU runs, or the one `TORCHCHAT_ISA` names (avx512, avx2, neon, scalar,
off); `TORCHCHAT_KERNELS=0` is `off` too (torch's ops only). Nothing is compiled at run time.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from torchchat.errors import TorchchatError

ENV_ISA = "TORCHCHAT_ISA"
ENV = "TORCHCHAT_KERNELS"  # "0": never use them (same as TORCHCHAT_ISA=off)
LEVELS = ("avx512", "avx2", "neon", "scalar")  # fastest first; "off": torch's ops only


@dataclass
class State:
    level: str  # one of LEVELS, or "off"
    bits: int  # the table's feature bits (simd_level), 0 when off
    status: str  # one line for -v: what runs and why
    available: tuple[str, ...] = ()  # the levels this machine runs, "off" last


def _off(reason: str, available: tuple[str, ...] = ()) -> State:
    return State("off", 0, f"CPU kernels off ({reason}); using torch's ops", (*available, "off"))


_current: State | None = None


def current() -> State:
    """The level in use: chosen on the first call (loading the library), then kept."""
    global _current
    if _current is None:
        _current = _initial()
    return _current


def use(level: str) -> State:
    """Switch the ops to `level`'s table ("off": torch's ops), e.g. for tests that run every
    level in one process; a TorchchatError if this machine does not run it."""
    global _current
    available = current().available
    if level == "off":
        _current = _off(f"{ENV_ISA}=off", available[:-1])
    elif level not in available:
        raise TorchchatError(
            f"{ENV_ISA}={level}: not available on this machine; available: {', '.join(available)}"
        )
    else:
        _current = _select(level, available)
    return _current


def _initial() -> State:
    requested = os.environ.get(ENV_ISA, "").strip().lower()
    if requested and requested not in (*LEVELS, "off"):
        raise TorchchatError(
            f"{ENV_ISA}={requested}: unknown level; known: {', '.join(LEVELS)}, off"
        )
    reason = _load_library()
    available = () if reason else tuple(torch.ops.torchchat.isa_levels().split(","))
    if requested == "off" or (not requested and os.environ.get(ENV, "1") == "0"):
        return _off(f"{ENV_ISA}=off" if requested else f"{ENV}=0", available)
    if reason:
        if requested:
            raise TorchchatError(f"{ENV_ISA}={requested}: CPU kernels {reason}; available: off")
        return _off(reason)
    if requested and requested not in available:
        raise TorchchatError(
            f"{ENV_ISA}={requested}: not available on this machine; available: "
            f"{', '.join((*available, 'off'))}"
        )
    level = requested or next((lv for lv in available if lv != "scalar"), None)
    if level is None:  # no SIMD level for this CPU: torch's ops beat the scalar reference
        return _off("no SIMD level for this CPU", available)
    return _select(level, (*available, "off"))


def _select(level: str, available: tuple[str, ...]) -> State:
    bits = int(torch.ops.torchchat.select_isa(level))
    assert bits >= 0, level  # in `available`: the library has it
    gguf = int(torch.ops.torchchat.ggml_gemm_types())
    return State(level, bits, f"CPU kernels: {level} ({describe_bits(bits, gguf)})", available)


def describe_bits(bits: int, gguf_integer: int = 0) -> str:
    """The kernel families a table's feature bits turn on; gguf_integer: the GGUF types it
    prefills in integers (1 << type, torch.ops.torchchat.ggml_gemm_types)."""
    families = ["float/int8 decode"] + ["int4"] * bool(bits & 2)
    families += ["8da4w integer prefill"] * bool(bits & 4)
    families += ["bf16 prefill GEMMs" if bits & 8 else "prefill GEMMs widened to fp32"]
    families += ["own fp32 prefill GEMM"] * bool(bits & 256)
    families += ["int8 integer decode"] * bool(bits & 512)
    families += ["int8 integer prefill"] * bool(bits & 1024)
    families += ["GGUF blocks"] * bool(bits & 16)
    families += ["int4 integer prefill"] * bool(bits & 64)
    families += ["int4/8da4w integer decode"] * bool(bits & 128)
    from torchchat.kernels.ggml import BLOCKS  # here: ggml imports this package

    names = [name for t, (name, _, _) in BLOCKS.items() if gguf_integer >> t & 1]
    families += [f"GGUF {'/'.join(names)} integer prefill"] * bool(names)
    return ", ".join(families)


@functools.cache
def _load_library() -> str:
    """Load _C (once); the reason it cannot be, or ''."""
    spec = importlib.util.find_spec("torchchat.kernels._C")
    if spec is None or not spec.origin:
        return "not built (pip install found no C++ compiler, or the build failed)"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as e:
        return f"not loaded ({e})"
    _register_fakes()
    return ""


def _register_fakes() -> None:
    """Output shapes for torch.compile / FakeTensor tracing."""

    @torch.library.register_fake("torchchat::linear")
    def _(x, w):
        return x.new_empty(x.shape[0], sum(t.shape[0] for t in w))

    @torch.library.register_fake("torchchat::linear_int8")
    def _(x, w, scales, group):
        return x.new_empty(x.shape[0], sum(t.shape[0] for t in w))

    @torch.library.register_fake("torchchat::linear_int4")
    def _(x, w, scales_and_zeros, group):
        return x.new_empty(x.shape[0], sum(t.shape[0] for t in w))

    @torch.library.register_fake("torchchat::linear_int4_q8")
    def _(x, w, scales_and_zeros, group, dynamic):
        return x.new_empty(x.shape[0], sum(t.shape[0] for t in w))

    @torch.library.register_fake("torchchat::gemm_int4")
    def _(x, w, scales_and_zeros, group):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::gemm_int8")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::gemm_wide")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::gemm_f32")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::gemm_8da4w")
    def _(x, w, scales_and_zeros, group):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::gemm_int4_q8")
    def _(x, w, scales_and_zeros, group):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::gemm_int8_q8")
    def _(x, w, scales, group):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("torchchat::silu_mul")
    def _(a, b):
        return torch.empty_like(a, memory_format=torch.contiguous_format)

    @torch.library.register_fake("torchchat::rope")
    def _(x, freqs):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("torchchat::attention")
    def _(q, k, v, mask, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("torchchat::decode_layers")
    def _(x, norms, eps, freqs, mask, pos, k_caches, v_caches, w, scales, kind, group, n_heads,
          types=()):  # fmt: skip
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("torchchat::decode_layers_paged")
    def _(x, norms, eps, freqs, pos, index, k_pools, v_pools, w, scales, kind, group, n_heads,
          types=()):  # fmt: skip
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("torchchat::linear_ggml")
    def _(x, w, types):
        return x.new_empty(x.shape[0], sum(t.shape[0] for t in w))

    @torch.library.register_fake("torchchat::gemm_ggml")
    def _(x, w, type):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("torchchat::ggml_rows")
    def _(w, type, K, ids):
        return w.new_empty(*ids.shape, K, dtype=torch.float32)
