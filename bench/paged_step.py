"""Time of one paged step: decoding sequences plus a prompt chunk, on the fused step and on the
modules, alternating in one process.

    python bench/paged_step.py [--shape stories110M] [--decoding 8] [--chunks 0 8 16 24 40]
                               [--context 200] [--repeats 5] [--threads 2] [--dtype fp32]

A model of a known shape with random weights. `--decoding` sequences are prefilled to
`--context` positions, then each measured step feeds each of them one token and one more
sequence a chunk of C prompt tokens at the same position. `fused` runs the step as the server
does (one call of the fused paged step for up to its call's rows, the modules beyond);
`modules` forces the modules (EagerRuntime.FUSED_ROWS = 0). Prints min / median ms a step.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from torchchat.bench.run import random_runtime
from torchchat.options import ExecutionOptions, ModelOptions
from torchchat.runtime.base import SeqChunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--decoding", type=int, default=8)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 8, 16, 24, 40])
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    longest = a.context + max(a.chunks) + 1
    rt = random_runtime(a.shape, ModelOptions(execution=ExecutionOptions(dtype=a.dtype)), longest)
    per_seq = -(-longest // a.block_size)
    seqs = a.decoding + 1
    rt.setup_paged(a.block_size, per_seq * seqs)
    rt.reserve_blocks(per_seq * seqs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    gen = torch.Generator().manual_seed(0)
    vocab = rt.args.vocab_size
    for i in range(seqs):
        rt.step([SeqChunk(i, torch.randint(0, vocab, (a.context,), generator=gen).tolist(), 0,
                          tables[i])])  # fmt: skip
    fused_rows = rt.FUSED_ROWS
    print(f"{a.shape} {a.dtype}, {a.decoding} sequences decoding {a.context} positions in, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")  # fmt: skip
    print("\n| step | fused ms (min / median) | modules ms |\n|---|---|---|")
    for c in a.chunks:
        chunks = [SeqChunk(i, [1], a.context, tables[i]) for i in range(a.decoding)]
        if c:
            tokens = torch.randint(0, vocab, (c,), generator=gen).tolist()
            chunks.append(SeqChunk(a.decoding, tokens, a.context, tables[a.decoding]))
        times: dict[int, list[float]] = {fused_rows: [], 0: []}
        for _ in range(a.repeats):
            for rows, ts in times.items():
                rt.FUSED_ROWS = rows
                t0 = time.perf_counter()
                rt.step(chunks)
                ts.append(time.perf_counter() - t0)
        cells = [
            f"{min(ts) * 1e3:.1f} / {sorted(ts)[len(ts) // 2] * 1e3:.1f}" for ts in times.values()
        ]
        print(f"| {a.decoding} decodes + {c} prompt tokens | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
