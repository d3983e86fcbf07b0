"""Decode/prefill speed per shape, precision, decode path and threads -> docs/performance.md.

    python bench/performance_report.py [--shapes stories15M stories110M tinyllama-1.1b] [--threads 1 2]
        [--precisions fp32 bf16 int8 "int4 g32" "8da4w g32"] [--compare auto|llama.cpp|none]
        [--decode fused compiled] [--prompt-tokens 64 [512]] [--output docs/performance.md]

Each configuration runs `torchchat bench --shape SHAPE` in its own process (random weights, so no
files are needed), a 64-token prompt (or each --prompt-tokens), 64 new tokens, median of 3. The
kernels' level is the one torchchat picks, or TORCHCHAT_ISA's (e.g. avx2 on an AVX-512 machine). Decode runs on torchchat's fused
step (the default) or through the model's modules compiled (`--compile --no-fused-decode`); a
compiled configuration runs twice against a fresh compile cache: the first process compiles, the second finds the cache, and
both compile times are reported. With llama.cpp installed (`pip install -e ".[llamacpp]"`) the
same weights run in llama.cpp too (eager and cached-compile runs), alternating with torchchat,
and the ratios torchchat/llama.cpp are reported. Run it on an otherwise idle machine: it refuses
to start when the load average says something else is running.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's torchchat, installed or not
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


def bench(
    shape: str,
    flags: list[str],
    threads: int,
    compiled: bool,
    compare: bool,
    cache_dir: str,
    prompt: int = 64,
) -> list[dict]:
    """One `torchchat bench` process: its rows (torchchat, then llama.cpp and ratio rows)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "torchchat", "bench", "--shape", shape, *flags, "--threads", str(threads),
               "--prompt-tokens", str(prompt), "--new-tokens", "64", "--repeats", "3", "--json", f.name]  # fmt: skip
        cmd += ["--compile", "--no-fused-decode"] if compiled else []
        cmd += ["--compare", "llama.cpp"] if compare else []
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if p.returncode != 0:
            return [{"error": (p.stderr.strip().splitlines() or ["?"])[-1]}]
        return json.loads(Path(f.name).read_text())


def configuration(
    shape: str, flags: list[str], threads: int, compiled: bool, compare: bool, prompt: int = 64
):
    """Rows of one configuration; a compiled one runs twice on a fresh compile cache, and
    its torchchat row gets both compile times."""
    with tempfile.TemporaryDirectory(prefix="torchchat-inductor-") as cache:
        if not compiled:
            return bench(shape, flags, threads, False, compare, cache, prompt)
        first = bench(shape, flags, threads, True, False, cache, prompt)
        rows = bench(shape, flags, threads, True, compare, cache, prompt)
    if "error" in first[0] or "error" in rows[0]:
        return first if "error" in first[0] else rows
    rows[0]["compile s first"], rows[0]["compile s cached"] = (
        first[0]["compile s"],
        rows[0]["compile s"],
    )
    return rows


def versions(compare: bool) -> str:
    from importlib.metadata import version

    from torchchat import kernels

    names = ["torch", "llama-cpp-python"] if compare else ["torch"]
    return (
        ", ".join(f"{n} {version(n)}" for n in names)
        + f", torchchat CPU kernels {kernels.describe()}"
    )


def _f(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=["stories15M", "stories110M", "tinyllama-1.1b"],
        help="NAME or NAME:T1,T2 (that shape at those thread counts only)",
    )
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    ap.add_argument(
        "--compare",
        choices=["auto", "llama.cpp", "none"],
        default="auto",
        help="run llama.cpp too (auto: when llama-cpp-python is installed)",
    )
    ap.add_argument(
        "--decode", nargs="+", choices=["fused", "compiled"], default=["fused", "compiled"]
    )
    ap.add_argument("--prompt-tokens", nargs="+", type=int, default=[64])
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument(
        "--note", default="", help="a line for the header (e.g. how llama.cpp was built)"
    )
    ap.add_argument("--title", default="Performance")
    a = ap.parse_args()
    if os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if a.compare == "llama.cpp" and not has_llama_cpp:
        sys.exit('--compare llama.cpp: llama.cpp is not installed: pip install -e ".[llamacpp]"')
    compare = a.compare == "llama.cpp" or (a.compare == "auto" and has_llama_cpp)
    header_versions = versions(compare)  # before the runs: a failure here must not cost them

    table = [
        "| shape | precision | decode | threads | prompt | decode tok/s | prefill tok/s | ttft ms | weights MB | GB/s | % of bw "
        "| peak RSS MB | setup s | compile s first | compile s cached | decode x llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    versus = [
        "| shape | precision | threads | prompt | llama.cpp GGUF | decode tok/s | prefill tok/s | ttft ms | weights MB | GB/s "
        "| % of bw | peak RSS MB | decode x | prefill x | ttft x | peak RSS x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    probes: dict[int, list[float]] = {}
    for spec in a.shapes:
        shape, _, only = spec.partition(":")  # "tinyllama-1.1b:2" = that shape at 2 threads only
        shape_threads = [int(t) for t in only.split(",")] if only else a.threads
        for name, compiled, threads, prompt in itertools.product(
            a.precisions, [d == "compiled" for d in a.decode], shape_threads, a.prompt_tokens
        ):
            rows = configuration(shape, PRECISIONS[name], threads, compiled, compare, prompt)
            decode = "compiled" if compiled else "fused"
            tag = f"| {shape} | {name} | {decode} | {threads} | {prompt} |"
            ours = rows[0]
            if "error" in ours:
                table.append(f"{tag} error: {ours['error']} |" + " |" * 11)
                print(table[-1], file=sys.stderr, flush=True)
                continue
            probes.setdefault(threads, []).append(ours["probe GB/s"])
            theirs = [r for r in rows if r["engine"] == "llama.cpp"]
            ratios = [r for r in rows if r["engine"] == "ratio"]
            vs = ", ".join(f"{_f(q['decode tok/s'], 2)} ({t['model'].split()[-1]})"
                           for t, q in zip(theirs, ratios, strict=True))  # fmt: skip
            table.append(
                f"{tag} {ours['decode tok/s']:.1f} | {ours['prefill tok/s']:.0f} | {ours['ttft ms']:.0f} | "
                f"{ours['weights MB']:.0f} | {ours['GB/s']:.1f} | {ours['% of bw']:.0f} | {ours['peak RSS MB']:.0f} | "
                f"{ours['setup s']:.1f} | {_f(ours.get('compile s first'))} | {_f(ours.get('compile s cached'))} | {vs} |"
            )
            print(table[-1], file=sys.stderr, flush=True)
            if compiled:
                continue  # llama.cpp's own figures are the eager run's
            for t, q in zip(theirs, ratios, strict=True):
                versus.append(
                    f"| {shape} | {name} | {threads} | {prompt} | {t['model'].split()[-1]} | {t['decode tok/s']:.1f} | "
                    f"{t['prefill tok/s']:.0f} | {t['ttft ms']:.0f} | {t['weights MB']:.0f} | {t['GB/s']:.1f} | "
                    f"{t['% of bw']:.0f} | {t['peak RSS MB']:.0f} | {_f(q['decode tok/s'], 2)} | "
                    f"{_f(q['prefill tok/s'], 2)} | {_f(q['ttft ms'], 2)} | {_f(q['peak RSS MB'], 2)} |"
                )
    probe_text = ", ".join(
        f"median {statistics.median(v):.1f} GB/s (range {min(v):.1f}-{max(v):.1f}) with {t} "
        f"thread{'s' if t > 1 else ''}"
        for t, v in sorted(probes.items())
    )
    lines = [
        f"# {a.title}",
        "",
        f"`python bench/performance_report.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores, {header_versions}, "
        f"`torchchat bench --shape SHAPE ... --prompt-tokens {'/'.join(map(str, a.prompt_tokens))} "
        "--new-tokens 64 --repeats 3`.",
        "Random N(0, 0.02) weights of each known shape, written to a checkpoint by a child process "
        "and loaded (and quantized) from it as a user's checkpoint is; medians of 3 runs."
        + (f" {a.note}" if a.note else ""),
        "",
        f"Memory read bandwidth (torchchat bench's probe: the faster of summing a 384 MB fp32 tensor whole "
        f"or as 8 rows along dim 0, median pass over 0.5 s): {probe_text or '-'}. "
        "`% of bw` is the decode GB/s (weights read per token x tokens/s) as a share of it.",
        "`decode`: `fused` is torchchat's default, every layer of a step in one kernel call "
        "(`torchchat::decode_layers`); `compiled` runs the model's modules as one torch.compile'd graph "
        "(`--compile --no-fused-decode`). "
        "Compiled configurations run twice on a fresh compile cache: `compile s first` is the first call "
        "(compile + run) of a process that compiles, `compile s cached` of a second process that finds its cache.",
        "",
        *table,
    ]
    if compare:
        lines += [
            "",
            "## torchchat vs llama.cpp",
            "",
            "The same random weights written as GGUF (fp32 -> F32, bf16 -> BF16 and F16, int8 -> Q8_0, int4 and 8da4w -> Q4_0; "
            "token embedding and output in the same type), run by llama.cpp (llama-cpp-python) with the same threads, "
            "prompt ids and token counts, one batch for the prompt, greedy decode; runs alternate torchchat / llama.cpp. "
            "`x` columns are torchchat / llama.cpp (torchchat's default, fused decode).",
            "",
            *versus,
        ]
    # The other reports (export_report.py, speculative_report.py, ...) keep their own sections.
    doc = a.output.read_text() if a.output.exists() else ""
    others = doc[doc.index("<!-- ") :] if "<!-- " in doc else ""
    a.output.write_text("\n".join(lines) + "\n" + ("\n" + others if others else ""))


if __name__ == "__main__":
    main()
