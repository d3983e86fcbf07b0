"""Write GGUF files of a known shape with random N(0, 0.02) weights, as people's downloads are
made: an F32 file, then llama.cpp's own quantizer (llama_model_quantize, through
llama-cpp-python) for each type asked -- the K-quant mixes (Q4_K_M: Q4_K with Q6_K for some
layers and the output) included. For docs/performance.md's GGUF table.

    pip install -e ".[llamacpp]"
    python bench/make_gguf_quants.py --shape tinyllama-1.1b --out /tmp/ggufs
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# llama.cpp's llama_ftype values
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12,
          "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tinyllama-1.1b")
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    import llama_cpp

    from torchchat.bench.gguf_writer import write_gguf
    from torchchat.bench.run import random_weights, shape_args

    a.out.mkdir(parents=True, exist_ok=True)
    f32 = a.out / f"{a.shape}-F32.gguf"
    if not f32.exists():
        args = shape_args(a.shape)
        write_gguf(f32, args, random_weights(args), "F32", name=f"{a.shape} random")
        print(f"wrote {f32}", file=sys.stderr)
    for t in a.types:
        out = a.out / f"{a.shape}-{t}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[t]
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(),
                                            ctypes.byref(params))  # fmt: skip
        if rc != 0:
            sys.exit(f"llama_model_quantize {t} failed ({rc})")
        print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)


if __name__ == "__main__":
    main()
