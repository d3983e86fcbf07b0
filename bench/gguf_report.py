"""GGUF files as people download them, torchchat against llama.cpp on the same file ->
the "gguf" section of docs/performance.md (or "gguf-avx2" under TORCHCHAT_ISA=avx2).

    python bench/make_gguf_quants.py --out /tmp/ggufs          # once: random-weight files
    python bench/gguf_report.py /tmp/ggufs/tinyllama-1.1b-{Q4_0,Q8_0,Q4_K_M,Q5_K_M,Q6_K}.gguf
        [--threads 2] [--prompt-tokens 64 512] [--section gguf]

Each file and setting runs `torchchat bench FILE --compare llama.cpp` in its own process: the
file's blocks as torchchat runs them by default, and llama.cpp (llama-cpp-python, its own
process, same threads, same prompt ids) on the very same file, alternating, medians of 3.
Peak RSS is each engine's own process. Run it on an otherwise idle machine: it refuses to start
when the load average says something else is running.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.performance_report import versions  # noqa: E402
from bench.report_doc import write_section  # noqa: E402


def bench(path: Path, threads: int, prompt: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "torchchat", "bench", str(path), "--compare", "llama.cpp",
               "--threads", str(threads), "--prompt-tokens", str(prompt), "--new-tokens", "64",
               "--repeats", "3", "--json", f.name]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if p.returncode != 0:
            return [{"error": (p.stderr.strip().splitlines() or ["?"])[-1]}]
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--threads", nargs="+", type=int, default=[2])
    ap.add_argument("--prompt-tokens", nargs="+", type=int, default=[64, 512])
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument(
        "--section", default=None, help="default: gguf, or gguf-ISA under TORCHCHAT_ISA"
    )
    ap.add_argument("--note", default="", help="a paragraph to put under the table")
    a = ap.parse_args()
    if os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    isa = os.environ.get("TORCHCHAT_ISA", "")
    section = a.section or ("gguf-" + isa if isa else "gguf")
    header_versions = versions(True)
    rows = [
        "| file | MB | threads | prompt | decode tok/s | llama.cpp | x | prefill tok/s | llama.cpp "
        "| x | ttft ms | llama.cpp | peak RSS MB | llama.cpp | RSS - llama.cpp MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, threads, prompt in itertools.product(a.files, a.threads, a.prompt_tokens):
        got = bench(path, threads, prompt)
        tag = f"| {path.name} | {path.stat().st_size / 1e6:.0f} | {threads} | {prompt} |"
        if "error" in got[0]:
            rows.append(f"{tag} error: {got[0]['error']} |" + " |" * 10)
        else:
            ours, theirs, ratio = got[0], got[1], got[2]
            rows.append(
                f"{tag} {ours['decode tok/s']:.1f} | {theirs['decode tok/s']:.1f} | "
                f"{ratio['decode tok/s']:.2f} | {ours['prefill tok/s']:.0f} | "
                f"{theirs['prefill tok/s']:.0f} | {ratio['prefill tok/s']:.2f} | "
                f"{ours['ttft ms']:.0f} | {theirs['ttft ms']:.0f} | {ours['peak RSS MB']:.0f} | "
                f"{theirs['peak RSS MB']:.0f} | {ours['peak RSS MB'] - theirs['peak RSS MB']:+.0f} |"
            )
        print(rows[-1], file=sys.stderr, flush=True)
    from torchchat import kernels

    level = isa or kernels.isa()
    lines = [
        f"## GGUF files on the {level} kernels" if isa else "## GGUF files",
        "",
        f"`python bench/gguf_report.py FILES` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores, {header_versions}"
        + (f", `TORCHCHAT_ISA={isa}`" if isa else "")
        + ". Files from `python bench/make_gguf_quants.py` (random N(0, 0.02) weights, llama.cpp's "
        "own quantizer); `torchchat bench FILE --compare llama.cpp --prompt-tokens P "
        "--new-tokens 64 --repeats 3`: the same file, same prompt ids, alternating, medians of 3. "
        "`x` = torchchat / llama.cpp.",
        "",
        *rows,
    ]
    if a.note:
        lines += ["", a.note]
    write_section(a.output, section, "\n".join(lines))
    print(f"wrote the {section} section of {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
