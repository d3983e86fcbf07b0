"""Decode/prefill speed per shape, precision, compile and threads -> docs/performance.md.

    python bench/performance_report.py [--shapes stories15M stories110M tinyllama-1.1b] [--threads 1 2]

Each configuration runs `torchchat bench --shape SHAPE` in its own process (random weights, so no
files are needed), 64-token prompt, 64 new tokens, median of 3. Run it on an otherwise idle
machine: it refuses to start when the load average says something else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {
    "fp32": ["--dtype", "fp32"],
    "bf16": ["--dtype", "bf16"],
    "int8": ["--quantize", '{"precision": {"dtype": "bf16"}, "linear:int8": {"groupsize": 0}}'],
    "int4 g32": [
        "--quantize",
        '{"precision": {"dtype": "bf16"}, "linear:int4": {"groupsize": 32}}',
    ],
    "8da4w g32": [
        "--quantize",
        '{"precision": {"dtype": "bf16"}, "linear:8da4w": {"groupsize": 32}}',
    ],
}


def bench(shape: str, flags: list[str], compiled: bool, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "torchchat", "bench", "--shape", shape, *flags, "--threads", str(threads),
               "--prompt-tokens", "64", "--new-tokens", "64", "--repeats", "3", "--json", f.name]  # fmt: skip
        if compiled:
            cmd.append("--compile")
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(Path(f.name).read_text())[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["stories15M", "stories110M", "tinyllama-1.1b"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    a = ap.parse_args()
    if os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    lines = [
        "# Performance",
        "",
        f"`python bench/performance_report.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores, torch `torchchat bench --shape SHAPE ... --prompt-tokens 64 --new-tokens 64 --repeats 3`.",
        "Random N(0, 0.02) weights of each known shape; medians of 3 runs.",
        "",
        "| shape | precision | compile | threads | decode tok/s | prefill tok/s | ttft ms | weights MB | GB/s | peak RSS MB | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in a.shapes:
        for name, flags in PRECISIONS.items():
            for compiled in (False, True):
                for threads in a.threads:
                    r = bench(shape, flags, compiled, threads)
                    tag = f"| {shape} | {name} | {'yes' if compiled else 'no'} | {threads} |"
                    if "error" in r:
                        lines.append(f"{tag} error: {r['error']} | | | | | | |")
                    else:
                        lines.append(
                            f"{tag} {r['decode tok/s']:.1f} | {r['prefill tok/s']:.0f} | {r['ttft ms']:.0f} | "
                            f"{r['weights MB']:.0f} | {r['GB/s']:.1f} | {r['peak RSS MB']:.0f} | {r['setup s']:.1f} |"
                        )
                    print(lines[-1], file=sys.stderr, flush=True)
    a.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
