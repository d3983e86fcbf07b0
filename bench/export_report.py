"""Export time, artifact size and decode speed of every artifact kind, in Python and in the C++
runners -> the "Exported models" section of docs/performance.md.

    python bench/export_report.py [--runner-build build/runner] [--max-seq-length 256]

For stories260K (the real checkpoint) and a random-weight stories110M shape: `torchchat export`
to `.pt2` (AOT Inductor) and `.pte` (ExecuTorch/XNNPACK), timed as whole commands; then, on each
artifact, `torchchat bench` (random 64-token prompt, 64 new tokens, median of 3) and the same
greedy generation ("Once upon a time", 128 new tokens) through `torchchat generate` and through
`aoti_run`/`et_run`, each printing its own decode tokens/s. Run it on an otherwise idle machine.
The runners are built first if `--runner-build` holds none (see the README's "C++ runners").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report_doc import write_section

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
sys.path.insert(0, str(REPO))

from torchchat.checkpoint.native import save_native  # noqa: E402
from torchchat.model.config import known_model_args  # noqa: E402
from torchchat.model.transformer import Transformer  # noqa: E402

BF16 = {"precision": {"dtype": "bf16"}}
# (model, artifact kind, label, export flags)
CONFIGS = [
    ("stories260K", "pt2", "fp32", ["--dtype", "fp32"]),
    ("stories260K", "pte", "fp32", ["--dtype", "fp32"]),
    ("stories110M", "pt2", "fp32", ["--dtype", "fp32"]),
    ("stories110M", "pt2", "bf16", ["--dtype", "bf16"]),
    ("stories110M", "pt2", "int8 (bf16)", ["--quantize", json.dumps({**BF16, "linear:int8": {"groupsize": 0}})]),
    ("stories110M", "pt2", "int4 g32 (bf16)", ["--quantize", json.dumps({**BF16, "linear:int4": {"groupsize": 32}})]),
    ("stories110M", "pte", "fp32", ["--dtype", "fp32"]),
    ("stories110M", "pte", "8da4w g32 + emb4", ["--quantize", json.dumps({"linear:8da4w": {"groupsize": 32}, "embedding": {"bitwidth": 4, "groupsize": 32}})]),
]  # fmt: skip
FLAG = {"pt2": "--aoti-package-path", "pte": "--pte-path"}
RUNNER = {"pt2": "aoti_run", "pte": "et_run"}


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, **kw)


def torchchat(*args) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torchchat", *args])


def random_stories110m(folder: Path) -> Path:
    """A native checkpoint of stories110M's shape with N(0, 0.02) weights (norms at 1)."""
    args = known_model_args("stories110M")
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {
        k: torch.ones(s)
        if k.endswith("norm.weight")
        else torch.empty(s).normal_(0, 0.02, generator=gen)
        for k, s in shapes.items()
    }
    path = folder / "stories110M-random.pth"
    save_native(path, args, sd)
    return path


def build_runners(build: Path) -> None:
    if (build / "aoti_run").exists() and (build / "et_run").exists():
        return
    prefix = torch.utils.cmake_prefix_path
    for cmd in (
        ["cmake", "-S", REPO / "runner", "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}"],
        ["cmake", "--build", build, "-j2"],
    ):  # fmt: skip
        p = run(cmd)
        if p.returncode != 0:
            sys.exit(f"runner build failed: {p.stderr.strip().splitlines()[-1:]}")


def last_line(p: subprocess.CompletedProcess) -> str:
    return (p.stderr.strip().splitlines() or ["?"])[-1]


def python_generate_tps(kind: str, artifact: Path, tok: Path, steps: int) -> float | str:
    p = torchchat("generate", FLAG[kind], artifact, "--tokenizer-path", tok, "--prompt", "Once upon a time",
                  "--temperature", "0", "--max-new-tokens", steps)  # fmt: skip
    m = re.search(r"decode ([\d.]+) tok/s", p.stderr)
    return float(m.group(1)) if p.returncode == 0 and m else f"error: {last_line(p)}"


def runner_tps(build: Path, kind: str, artifact: Path, runner_tok: Path, steps: int) -> float | str:
    p = run(
        [
            build / RUNNER[kind],
            artifact,
            "-z",
            runner_tok,
            "-i",
            "Once upon a time",
            "-t",
            0,
            "-n",
            steps,
        ]
    )
    m = re.search(r"decode ([\d.]+) tokens/s", p.stderr)
    return float(m.group(1)) if p.returncode == 0 and m else f"error: {last_line(p)}"


def bench_row(kind: str, artifact: Path, tok: Path) -> dict | str:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p = torchchat("bench", FLAG[kind], artifact, "--tokenizer-path", tok, "--prompt-tokens", 64,
                      "--new-tokens", 64, "--repeats", 3, "--json", f.name)  # fmt: skip
        return json.loads(Path(f.name).read_text())[0] if p.returncode == 0 else last_line(p)


def cell(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runner-build", type=Path, default=REPO / "build" / "runner")
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=128, help="new tokens for generate vs runner")
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--only", help="run only configs whose model matches (e.g. stories260K)")
    ap.add_argument("--ignore-load", action="store_true", help="smoke runs: time even when busy")
    a = ap.parse_args()
    if not a.ignore_load and os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    build_runners(a.runner_build)
    work = Path(tempfile.mkdtemp(prefix="export-report-"))
    models = {
        "stories260K": (SHARED / "stories260K" / "stories260K.bin", SHARED / "stories260K" / "tok512.model"),
        "stories110M": (random_stories110m(work), SHARED / "llama2c-tokenizer" / "tokenizer.model"),
    }  # fmt: skip
    runner_tok = {}
    for name, (_, tok) in models.items():
        runner_tok[name] = work / f"{name}.tok.bin"
        p = torchchat("tokenizer-export", tok, "--output", runner_tok[name])
        if p.returncode != 0:
            sys.exit(f"tokenizer-export failed: {last_line(p)}")
    lines = [
        "| model | artifact | precision | export s | size MB | bench decode tok/s | bench prefill tok/s "
        "| generate decode tok/s | runner decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, kind, label, flags in CONFIGS:
        if a.only and a.only != model:
            continue
        ckpt, tok = models[model]
        artifact = work / f"{model}-{kind}-{len(lines)}.{kind}"
        out = "--output-aoti-package-path" if kind == "pt2" else "--output-pte-path"
        t = time.perf_counter()
        p = torchchat("export", ckpt, "--tokenizer-path", tok, "--max-seq-length", a.max_seq_length,
                      *flags, out, artifact)  # fmt: skip
        secs = time.perf_counter() - t
        tag = f"| {model} | .{kind} | {label} |"
        if p.returncode != 0:
            lines.append(f"{tag} error: {last_line(p)} | | | | | |")
        else:
            b = bench_row(kind, artifact, tok)
            gen = python_generate_tps(kind, artifact, tok, a.steps)
            cpp = runner_tps(a.runner_build, kind, artifact, runner_tok[model], a.steps)
            size = artifact.stat().st_size / 2**20
            if isinstance(b, str):
                lines.append(
                    f"{tag} {secs:.0f} | {size:.1f} | error: {b} | | {cell(gen)} | {cell(cpp)} |"
                )
            else:
                lines.append(
                    f"{tag} {secs:.0f} | {size:.1f} | {b['decode tok/s']:.1f} | {b['prefill tok/s']:.0f} "
                    f"| {cell(gen)} | {cell(cpp)} |"
                )
        print(lines[-1], file=sys.stderr, flush=True)
    section = "\n".join([
        "## Exported models: export time, size, decode speed (Python and C++ runners)",
        "",
        f"`python bench/export_report.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, `--max-seq-length {a.max_seq_length}`. "
        "stories110M is random N(0, 0.02) weights of that shape. `bench` columns: `torchchat bench "
        "--aoti-package-path/--pte-path X` (64-token random prompt, 64 new tokens, median of 3). "
        f"`generate` and `runner` columns: the same greedy run (\"Once upon a time\", {a.steps} new "
        "tokens) through `torchchat generate` and through `aoti_run`/`et_run`, each as it reports "
        "its own decode tokens/s.",
        "",
        *lines,
    ])  # fmt: skip
    write_section(a.output, "export_report", section)
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
