"""Time from start to the first generated text printed, as a user waits for it: `torchchat
generate FILE` against llama.cpp (llama-cpp-python in a fresh Python) loading the same GGUF and
streaming, both fresh processes, alternating, the same prompt. Issue #21's target: <= 2x
llama.cpp's.

    PYTHONPATH=/opt/llama-native python bench/first_token.py /tmp/ggufs/tinyllama-1.1b-Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LLAMA_CPP = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=512, verbose=False)
for out in llm(sys.argv[3], max_tokens=int(sys.argv[4]), temperature=0, stream=True):
    sys.stdout.write(out["choices"][0]["text"])
    sys.stdout.flush()
"""


def first_output(cmd: list[str], threads: int) -> float:
    """Seconds from starting cmd to its first byte on stdout (it then runs to its end)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # generate's torch threads
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    first = p.stdout.read(1)
    t = time.perf_counter() - t0
    _, err = p.communicate()
    if p.returncode != 0 or not first:
        sys.exit(f"{cmd[:4]} failed ({p.returncode}): {err.decode()[-500:]}")
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--engines", nargs="+", choices=["torchchat", "llama.cpp"],
                   default=["torchchat", "llama.cpp"])  # fmt: skip
    a = p.parse_args()
    ours = [sys.executable, "-m", "torchchat", "generate", str(a.gguf), "--prompt", a.prompt,
            "--max-new-tokens", str(a.new_tokens), "--temperature", "0"]  # fmt: skip
    theirs = [sys.executable, "-c", LLAMA_CPP, str(a.gguf), str(a.threads), a.prompt,
              str(a.new_tokens)]  # fmt: skip
    cmds = {"torchchat": ours, "llama.cpp": theirs}
    times: dict[str, list[float]] = {k: [] for k in a.engines}
    for _ in range(a.runs):
        for k in a.engines:
            times[k].append(first_output(cmds[k], a.threads))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: median {med[k]:.2f} s ({', '.join(f'{t:.2f}' for t in v)})")
    if len(med) == 2:
        print(f"torchchat / llama.cpp: {med['torchchat'] / med['llama.cpp']:.2f}x")


if __name__ == "__main__":
    main()
