"""What this machine's GEMMs reach: the bound on prefill, as the read bandwidth is decode's.

    python bench/gemm_rate.py [--threads 2]

torch's (oneDNN's) GEMMs on this CPU: fp32 and bf16 matmuls and int8 x int8 -> int32
(torch._int_mm, VNNI where the CPU has it), square 2048 and at prefill's shape (64 tokens
against a 2048 x 768 weight), best of 5 timed loops. Prints GFLOP/s (int8: GMAC/s, one
multiply-add a product as the integer kernels count it). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def best_seconds(f, *args, seconds: float = 0.3) -> float:
    """Seconds of one call f(*args), the best of 5 loops."""
    f(*args)
    best = float("inf")
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5 or n == 0:
            f(*args)
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="run on a busy machine (tests)")
    a = ap.parse_args()
    if os.getloadavg()[0] > 0.7 and not a.force:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    for m, n, k in ((2048, 2048, 2048), (64, 2048, 768)):
        for dt in (torch.float32, torch.bfloat16):
            x, w = torch.randn(m, k).to(dt), torch.randn(n, k).to(dt)
            s = best_seconds(torch.mm, x, w.T)
            print(f"{str(dt)[6:]:>8} {m} x {k} @ {k} x {n}: {2 * m * n * k / s / 1e9:7.1f} GFLOP/s")
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        s = best_seconds(torch._int_mm, x, w)
        print(f"    int8 {m} x {k} @ {k} x {n}: {m * n * k / s / 1e9:7.1f} GMAC/s")


if __name__ == "__main__":
    main()
