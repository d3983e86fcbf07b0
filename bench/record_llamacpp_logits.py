"""Record llama.cpp's own CPU logits on the shared tiny GGUF files, for the tests that hold the
packed GGUF path to them (tests/gguf/test_llamacpp_logits.py).

For each quantized file in ../shared/models/tiny-random-gguf-quants, llama.cpp (through
llama-cpp-python) evaluates fixed token ids twice -- as one batch (its prefill kernels) and one
token at a time (its decode kernels, which quantize activations differently for some types) --
and every position's logits are saved to tests/gguf/llamacpp_logits.npz as NAME (the batch) and
NAME_decode, with the llama-cpp-python version and the CPU features of the build. The KV cache is kept in F32 (llama.cpp's default is F16) so that the comparison measures
the weights' and activations' handling, not a cache rounding torchchat does not do.

    pip install -e ".[llamacpp]"     # builds llama.cpp (~15 min)
    python bench/record_llamacpp_logits.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUANTS = REPO.parent / "shared" / "models" / "tiny-random-gguf-quants"
OUT = REPO / "tests" / "gguf" / "llamacpp_logits.npz"
FILES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
TOKENS = [1, 400, 57, 312, 99, 7, 250, 3, 17, 42, 300, 11]
GGML_F32 = 0


def record(name: str, one_by_one: bool) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(QUANTS / f"tiny-random-{name}.gguf"),
        n_ctx=64,
        n_batch=64,
        n_threads=2,
        logits_all=True,
        type_k=GGML_F32,
        type_v=GGML_F32,
        verbose=False,
    )
    for chunk in [[t] for t in TOKENS] if one_by_one else [TOKENS]:
        llm.eval(chunk)
    return np.array(llm.scores[: len(TOKENS)], dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=OUT)
    a = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("needs llama-cpp-python: pip install -e '.[llamacpp]'")
    logits = {name: record(name, False) for name in FILES}
    logits |= {f"{name}_decode": record(name, True) for name in FILES}
    info = llama_cpp.llama_print_system_info().decode().strip()
    np.savez_compressed(
        a.output,
        tokens=np.array(TOKENS),
        version=np.array(llama_cpp.__version__),
        system_info=np.array(info),
        **logits,
    )
    print(f"wrote {a.output}: {len(FILES)} files x {len(TOKENS)} positions, llama-cpp-python "
          f"{llama_cpp.__version__} ({info})")  # fmt: skip


if __name__ == "__main__":
    main()
