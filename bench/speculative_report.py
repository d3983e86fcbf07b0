"""Speculative decoding on stories260K with quantized drafts -> a section of docs/performance.md.

    python bench/speculative_report.py [--new-tokens 200] [--speculate-k 5]

Each prompt runs greedily through `torchchat generate` three times per configuration (plain, and
drafting with an int8 / int4 copy of the model); the report gives the median decode tokens/s,
the draft acceptance rate, the speedup over plain decoding, and whether the generated text is
identical to plain decoding's (it must be: greedy speculative decoding is exact). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report_doc import write_section

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
PROMPTS = ["Once upon a time", "Lily and Tom went to the park", ""]
DRAFTS = {
    "plain": None,
    "int8 draft": {"linear:int8": {"groupsize": 0}},
    "int4 g32 draft": {"linear:int4": {"groupsize": 32}},
}

SLOWER = [
    "",
    "No speedup here: stories260K is so small that a decode step costs about the same at any",
    "precision (per-call overhead, not weight reads, bounds it), so a quantized draft saves little",
    "per token while the verification pass adds work. Speculation pays when the draft is much",
    "cheaper than the target, as for large models read at the memory-bandwidth limit.",
]


def generate(prompt: str, draft: dict | None, new_tokens: int, k: int) -> tuple[str, float, str]:
    cmd = [sys.executable, "-m", "torchchat", "generate", str(MODEL), "--prompt", prompt,
           "--temperature", "0", "--max-new-tokens", str(new_tokens)]  # fmt: skip
    if draft is not None:
        cmd += ["--draft-quantize", json.dumps(draft), "--speculate-k", str(k)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"generate failed: {p.stderr.strip().splitlines()[-1:]}")
    decode = float(re.search(r"decode ([\d.]+) tok/s", p.stderr).group(1))
    accept = re.search(r"draft acceptance (\d+% \(\d+/\d+\))", p.stderr)
    return p.stdout, decode, accept.group(1) if accept else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--speculate-k", type=int, default=5)
    ap.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--ignore-load", action="store_true", help="smoke runs: time even when busy")
    a = ap.parse_args()
    if not a.ignore_load and os.getloadavg()[0] > 0.7:
        sys.exit("the machine is busy (load average > 0.7): timings would be wrong")
    rows = [
        "| prompt | configuration | decode tok/s (median of 3) | speedup | draft acceptance | text identical to plain |",
        "|---|---|---|---|---|---|",
    ]
    speedups = []
    for prompt in PROMPTS:
        plain_text, plain_tps = None, None
        for name, draft in DRAFTS.items():
            runs = [generate(prompt, draft, a.new_tokens, a.speculate_k) for _ in range(3)]
            tps = statistics.median(r[1] for r in runs)
            text = runs[0][0]
            if draft is None:
                plain_text, plain_tps = text, tps
            same = all(r[0] == plain_text for r in runs)
            if draft is not None:
                speedups.append(tps / plain_tps)
            rows.append(
                f"| {prompt!r} | {name} | {tps:.0f} | {tps / plain_tps:.2f}x | {runs[0][2] or '-'} "
                f"| {'yes' if same else 'NO'} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    section = "\n".join([
        "## Speculative decoding, stories260K",
        "",
        f"`python bench/speculative_report.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores. `torchchat generate stories260K.bin --temperature 0 --max-new-tokens "
        f"{a.new_tokens}`, plain and with `--draft-quantize CFG --speculate-k {a.speculate_k}` (the draft "
        "is a quantized copy of the model).",
        "",
        *rows,
        *(SLOWER if max(speedups) < 1 else []),
    ])  # fmt: skip
    write_section(a.output, "speculative_report", section)
    print(f"wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
