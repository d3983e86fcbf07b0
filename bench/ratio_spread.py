"""How much one `--compare llama.cpp` ratio moves: the same comparison in several processes ->
the "ratio_spread" section of docs/performance.md.

    python bench/ratio_spread.py [--shapes stories110M tinyllama-1.1b] [--runs 3] [--threads 2]
        [--precisions fp32 bf16 int8 "int4 g32"]

This machine's read bandwidth differs from one allocation to the next (37-87 GB/s for the same
probe), so a single process's torchchat/llama.cpp ratio can be off by 20% either way. Each
configuration here runs `torchchat bench --compare llama.cpp` (fused decode, 64-token prompt, 64
new tokens, median of 3) in `--runs` separate processes; the section gives every run's decode
ratio and their median. Needs llama.cpp (`pip install -e ".[llamacpp]"`) and an idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from performance_report import PRECISIONS, bench  # noqa: E402
from report_doc import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["stories110M", "tinyllama-1.1b"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8", "int4 g32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    a = ap.parse_args()
    if os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    rows = [
        "| shape | precision | llama.cpp GGUF | decode x llama.cpp, each run | median | torchchat tok/s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for shape in a.shapes:
        for name in a.precisions:
            ratios: dict[str, list[float]] = {}
            ours = []
            for _ in range(a.runs):
                with tempfile.TemporaryDirectory(prefix="torchchat-inductor-") as cache:
                    out = bench(shape, PRECISIONS[name], a.threads, False, True, cache)
                if "error" in out[0]:
                    sys.exit(f"{shape} {name}: {out[0]['error']}")
                ours.append(out[0]["decode tok/s"])
                for r in out:
                    if r["engine"] == "ratio":
                        ratios.setdefault(r["model"].split()[-1], []).append(r["decode tok/s"])
            for gguf, rs in ratios.items():
                each = ", ".join(f"{r:.2f}" for r in rs)
                rows.append(
                    f"| {shape} | {name} | {gguf} | {each} | {statistics.median(rs):.2f} "
                    f"| {statistics.median(ours):.1f} |"
                )
                print(rows[-1], file=sys.stderr, flush=True)
    section = "\n".join([
        "## How much a ratio moves between processes",
        "",
        f"`python bench/ratio_spread.py --runs {a.runs} --threads {a.threads}` on "
        f"{time.strftime('%Y-%m-%d')} ({platform.machine()}): each row is `torchchat bench --shape SHAPE "
        "... --compare llama.cpp` run in separate processes (fused decode, 64-token prompt, 64 new tokens, "
        "median of 3 in each); the ratios of every run, then their median.",
        "",
        *rows,
    ])  # fmt: skip
    write_section(a.output, "ratio_spread", section)
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
