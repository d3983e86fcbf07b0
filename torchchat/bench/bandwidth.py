"""How fast this machine reads memory: the ceiling for decode, which reads every weight once a token."""

from __future__ import annotations

import statistics
import time

import torch

PROBE_BYTES = 384 * 2**20  # well past any last-level cache
ROWS = 8  # rows summed together by the second pattern


def read_bandwidth(threads: int | None = None, seconds: float = 0.5) -> float:
    """GB/s of the faster of two ways to read a 384 MB fp32 tensor, median pass of each over
    `seconds` in all: summing it whole (one sequential stream per thread) and summing it as
    (ROWS, n) along dim 0 (ROWS streams per thread, as a matrix-vector product reads). Which
    one a machine's prefetchers prefer varies, so both are tried and the faster one counts.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.ones(PROBE_BYTES // 4)  # written, so every page is resident
        rows = x.view(ROWS, -1)
        out = torch.empty(rows.shape[1])
        patterns = (x.sum, lambda: torch.sum(rows, dim=0, out=out))
        best = min(_median_time(fn, seconds / len(patterns)) for fn in patterns)
        return PROBE_BYTES / best / 1e9
    finally:
        torch.set_num_threads(before)


def _median_time(fn, seconds: float) -> float:
    """Median time of repeated calls over `seconds` (the median, not the best: one pass that
    the scheduler or the page cache flatters must not set the machine's ceiling)."""
    fn()  # warm
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
