"""Where a decode step's time goes -> the "What bounds decode" section of docs/performance.md.

    python bench/decode_profile.py [--shape stories110M] [--threads 2]

For each precision: the decode step of a random-weight model of the shape through the model's
modules (eager and compiled) profiled with torch.profiler (time per token in the weight kernels
vs everything else), the weight kernel alone on copies of a layer's w1 (GB/s it streams from
memory), and the fused step (torchchat::decode_layers: every layer in one call, the default),
next to the machine's read bandwidth from bench's probe. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_doc import write_section  # noqa: E402

from torchchat.bench.bandwidth import read_bandwidth  # noqa: E402
from torchchat.bench.run import random_runtime  # noqa: E402
from torchchat.options import ExecutionOptions, ModelOptions, QuantizeOptions  # noqa: E402
from torchchat.runtime.eager import EagerRuntime  # noqa: E402

PRECISIONS = {
    "fp32": None,
    "bf16": '{"precision": {"dtype": "bf16"}}',
    "int8": '{"precision": {"dtype": "bf16"}, "linear:int8": {"groupsize": 0}}',
    "int4 g32": '{"precision": {"dtype": "bf16"}, "linear:int4": {"groupsize": 32}}',
}
# The ops that read weights: torchchat's CPU kernels, and torch's float matmuls and packed
# int8/int4 kernels where those run (TORCHCHAT_KERNELS=0, or no AVX-512).
WEIGHT_OPS = (
    "torchchat::linear",
    "torchchat::linear_int8",
    "torchchat::linear_int4",
    "aten::mm",
    "aten::addmm",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
)
FUSED_OPS = ("torchchat::decode_layers",)  # the fused step: all layers, one op


@torch.inference_mode()
def profile_step(runtime, steps: int = 32) -> tuple[float, float]:
    """(ms per decode step, ms of it in weight kernels), from torch.profiler's CPU totals."""
    runtime.prefill(torch.zeros(1, 8, dtype=torch.long), 0)
    for pos in range(8, 16):  # warm
        runtime.decode(torch.tensor([[1]]), pos)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for pos in range(16, 16 + steps):
            runtime.decode(torch.tensor([[1]]), pos)
        total = (time.perf_counter() - t0) / steps * 1e3
    ops = FUSED_OPS if runtime.fused_decode else WEIGHT_OPS
    kernels = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ops)
    return total, kernels / steps / 1e3


@torch.inference_mode()
def plain_ms(runtime, steps: int = 48) -> float:
    """ms per decode step, best of 3 loops, without the profiler (which slows a step of ~130 ops
    far more than one of a few)."""
    runtime.prefill(torch.zeros(1, 8, dtype=torch.long), 0)
    for pos in range(8, 16):
        runtime.decode(torch.tensor([[1]]), pos)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for pos in range(16, 16 + steps):
            runtime.decode(torch.tensor([[1]]), pos)
        best = min(best, (time.perf_counter() - t0) / steps * 1e3)
    return best


@torch.inference_mode()
def kernel_gbps(runtime) -> tuple[str, float]:
    """Copies of the first layer's w1, 256 MB of them (8x the largest last-level caches here),
    one token at a time: bytes of weight per second of the kernel alone, from memory, with no
    other work around it."""
    import copy

    w1 = runtime.model.layers[0].feed_forward.w1
    each = sum(t.numel() * t.element_size() for t in w1.state_dict().values())
    linears = [copy.deepcopy(w1) for _ in range(max(1, (256 << 20) // each))]
    nbytes = each * len(linears)
    x = torch.randn(1, 1, runtime.model.args.dim).to(runtime.model.norm.weight.dtype)
    for lin in linears:
        lin(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for lin in linears:
            lin(x)
        n += 1
    return "w1", nbytes * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="stories110M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    a = ap.parse_args()
    if os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    torch.set_num_threads(a.threads)
    bw = read_bandwidth(a.threads)
    rows = [
        "| precision | compile | ms per token | in weight kernels | elsewhere | decode GB/s | w1 kernels alone: GB/s | % of probe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fused = [
        "| precision | ms per token | in decode_layers | elsewhere | decode GB/s | % of probe | compiled / fused ms, same weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, recipe in PRECISIONS.items():
        for compiled in (False, True):
            opts = ModelOptions(
                quantization=QuantizeOptions(recipe=recipe),
                execution=ExecutionOptions(compile=compiled, fused_decode=False),
            )
            rt = random_runtime(a.shape, opts, 64)
            total, kernels = profile_step(rt)
            _, gbps = kernel_gbps(rt)
            rows.append(
                f"| {name} | {'yes' if compiled else 'no'} | {total:.2f} | {kernels:.2f} ({100 * kernels / total:.0f}%) "
                f"| {total - kernels:.2f} | {rt.weight_bytes / total / 1e6:.1f} | {gbps:.1f} | {100 * gbps / bw:.0f}% |"
            )  # fmt: skip
            print(rows[-1], file=sys.stderr, flush=True)
        # the same weights on the fused step: this machine's read rate differs from one
        # allocation to the next, so other weights would not compare
        compiled_ms = plain_ms(rt)
        rt = EagerRuntime(rt.model, 64)
        assert rt.fused_decode, f"{name}: the fused step does not apply"
        fused_ms = plain_ms(rt)
        total, layers = profile_step(rt)
        gbps = rt.weight_bytes / total / 1e6
        fused.append(
            f"| {name} | {total:.2f} | {layers:.2f} ({100 * layers / total:.0f}%) | {total - layers:.2f} "
            f"| {gbps:.1f} | {100 * gbps / bw:.0f}% | {compiled_ms:.2f} / {fused_ms:.2f} |"
        )  # fmt: skip
        print(fused[-1], file=sys.stderr, flush=True)
    section = "\n".join([
        "## What bounds decode",
        "",
        f"`python bench/decode_profile.py --shape {a.shape} --threads {a.threads}` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.machine()}, torch {torch.__version__}, decode of random weights, read bandwidth probe "
        f"{bw:.1f} GB/s (all in one process).",
        "",
        "Through the model's modules (`--no-fused-decode`), eager and `--compile`: `in weight kernels` is "
        f"torch.profiler's self time of the ops that read weights ({', '.join(WEIGHT_OPS)}); `w1 kernels alone` "
        "runs 256 MB of copies of a layer's w1 in turn on one token (8x the last-level cache), so it is what "
        "the kernel streams from memory with nothing else around it.",
        "",
        *rows,
        "",
        "The fused step (the default): `in decode_layers` is the one op that runs every layer (norms, "
        "projections, RoPE, cache writes, attention, gates, residuals); `elsewhere` is the embedding, the "
        "final norm, the output layer and Python. The last column times the compiled modules and the fused "
        "step on the same weights without the profiler (best of 3 loops of 48 steps).",
        "",
        *fused,
    ])  # fmt: skip
    write_section(a.output, "decode_profile", section)
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
