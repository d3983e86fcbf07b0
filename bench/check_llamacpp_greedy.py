"""Does llama.cpp run the weights `torchchat bench --compare llama.cpp` hands it as torchchat does?

    python bench/check_llamacpp_greedy.py [--shape stories15M] [--new-tokens 48] [--threads 2]

Writes a shape's random weights as an F32 GGUF, decodes the same random prompts greedily in
torchchat (fp32) and in llama.cpp (F32 KV cache, so neither side rounds), and exits 1 unless the
tokens are identical. Needs llama-cpp-python (`pip install -e ".[llamacpp]"`); not a test, since
the package is optional and takes ~15 minutes to build.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from torchchat.bench.llamacpp import LlamaCppWorker, llama_cpp_version, require_llama_cpp
from torchchat.bench.run import (
    random_prompts,
    random_runtime,
    random_weights,
    run_once,
    shape_args,
    write_ggufs,
)
from torchchat.options import ExecutionOptions, ModelOptions


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="stories15M")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    require_llama_cpp()
    torch.set_num_threads(a.threads)
    args = shape_args(a.shape)
    sd = random_weights(args)
    max_seq = a.prompt_tokens + a.new_tokens
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{a.shape}-F32.gguf"
        write_ggufs(args, sd, {"F32": path})
        runtime = random_runtime(
            a.shape, ModelOptions(execution=ExecutionOptions(dtype="fp32")), max_seq, sd
        )
        worker = LlamaCppWorker(path, a.threads, max_seq, a.prompt_tokens, f32_kv_cache=True)
        try:
            for prompt in random_prompts(args.vocab_size, a.prompt_tokens, a.prompts):
                ours = run_once(runtime, prompt, a.new_tokens)[2]
                theirs = worker.run(prompt, a.new_tokens).tokens
                same = next(
                    (i for i, (x, y) in enumerate(zip(ours, theirs, strict=True)) if x != y),
                    len(ours),
                )
                ok &= ours == theirs
                print(
                    f"prompt {prompt[:4]}...: {same}/{a.new_tokens} greedy tokens agree", flush=True
                )
        finally:
            worker.kill()
    verdict = "identical" if ok else "DIFFERENT"
    print(f"{a.shape} F32, llama-cpp-python {llama_cpp_version()}: greedy tokens {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
