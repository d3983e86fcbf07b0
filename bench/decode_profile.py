"""Where a decode step's time goes -> the "What bounds decode" section of docs/performance.md.

    python bench/decode_profile.py [--shape stories110M] [--threads 2]

For each precision: the eager decode step of a random-weight model of the shape, profiled with
torch.profiler (time per token in the weight kernels vs everything else), and the weight
kernel alone on the model's largest matrix in a loop (GB/s it streams), next to the machine's
read bandwidth from bench's probe. Run it on an otherwise idle machine.
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
from torchchat.options import ModelOptions  # noqa: E402

PRECISIONS = {
    "fp32": None,
    "bf16": '{"precision": {"dtype": "bf16"}}',
    "int8": '{"precision": {"dtype": "bf16"}, "linear:int8": {"groupsize": 0}}',
    "int4 g32": '{"precision": {"dtype": "bf16"}, "linear:int4": {"groupsize": 32}}',
}
# The ops that read weights: float matmuls and the packed int8/int4 kernels.
WEIGHT_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
)


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
    kernels = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in WEIGHT_OPS)
    return total, kernels / steps / 1e3


@torch.inference_mode()
def kernel_gbps(runtime) -> tuple[str, float]:
    """Every layer's w1 in turn (together far larger than the caches), one token at a time:
    bytes of weight per second of the kernel alone, with no other work around it."""
    model = runtime.model
    linears = [layer.feed_forward.w1 for layer in model.layers]
    nbytes = sum(t.numel() * t.element_size() for lin in linears for t in lin.state_dict().values())
    x = torch.randn(1, 1, model.args.dim).to(model.norm.weight.dtype)
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
        "| precision | ms per token | in weight kernels | elsewhere | decode GB/s | w1 kernels alone: GB/s | % of probe |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, recipe in PRECISIONS.items():
        rt = random_runtime(a.shape, ModelOptions(quantize=recipe), 64)
        total, kernels = profile_step(rt)
        _, gbps = kernel_gbps(rt)
        rows.append(
            f"| {name} | {total:.2f} | {kernels:.2f} ({100 * kernels / total:.0f}%) | {total - kernels:.2f} "
            f"| {rt.weight_bytes / total / 1e6:.1f} | {gbps:.1f} | {100 * gbps / bw:.0f}% |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    section = "\n".join([
        "## What bounds decode",
        "",
        f"`python bench/decode_profile.py --shape {a.shape} --threads {a.threads}` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.machine()}, torch {torch.__version__}, eager decode of random weights, read bandwidth "
        f"probe {bw:.1f} GB/s. `in weight kernels` is torch.profiler's self time of the ops that read "
        f"weights ({', '.join(WEIGHT_OPS)}); `w1 kernels alone` runs every layer's w1 in turn on one token "
        "(together far larger than the caches), so it is what the kernel streams with nothing else around it.",
        "",
        *rows,
    ])  # fmt: skip
    write_section(a.output, "decode_profile", section)
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
