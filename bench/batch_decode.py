"""Batched decoding: aggregate decode tokens/s of 1 vs N concurrent greedy streams.

    python bench/batch_decode.py [--shape stories110M] [--streams 1 2 4 8 16] [--max-batch 16]
                                 [--new-tokens 64] [--block-size 16] [--threads N] [--dtype bf16]

A model of a known shape with random weights (no download), the llama2.c tokenizer from
../shared/models for detokenizing. Two measurements, each repeated and reported as a median:

- runtime: the decode loop alone. `B=1 path` is what `torchchat generate` runs (one sequence,
  `runtime.decode`); `paged, k streams` runs `runtime.step` over k sequences in the paged KV
  pool (one stream alone takes the fused step, as the server does), greedy, k tokens a step.
- engine: the server's engine (no HTTP): k concurrent requests with different prompts,
  completion tokens over the time from submitting them to their last token.

Prints a Markdown table, the ratio of N streams to 1 stream (B=1 path and paged), and the KV
memory of the engine at its largest run against per-slot rows of the whole context.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from torchchat.bench.run import random_runtime
from torchchat.options import ExecutionOptions, ModelOptions, SamplingOptions
from torchchat.runtime.base import ModelRuntime, SeqChunk
from torchchat.server.engine import Choice, End, Engine, Failed, Finish, Job
from torchchat.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "models" / "llama2c-tokenizer" / "tokenizer.model"
GREEDY = SamplingOptions(temperature=0)


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    """n different prompts of random ids (BOS first), the same on every run."""
    gen = torch.Generator().manual_seed(0)
    return [[1, *torch.randint(3, vocab, (length - 1,), generator=gen).tolist()] for _ in range(n)]


def single_path_tps(rt: ModelRuntime, prompt: list[int], steps: int) -> float:
    """Decode tokens/s of one sequence on the B=1 path (prefill, then `steps` decode calls)."""
    rt.cached = []
    token = int(torch.argmax(rt.prefill(torch.tensor([prompt]), 0)))
    t0 = time.perf_counter()
    for i in range(steps):
        token = int(torch.argmax(rt.decode(torch.tensor([[token]]), len(prompt) + i)))
    return steps / (time.perf_counter() - t0)


def paged_tps(rt: ModelRuntime, batch: list[list[int]], steps: int) -> float:
    """Aggregate decode tokens/s of len(batch) sequences in the paged KV pool (block tables of
    consecutive blocks, one sequence after the other)."""
    per_seq = -(-(max(map(len, batch)) + steps) // rt.block_size)
    rt.reserve_blocks(per_seq * len(batch))
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(batch))]
    chunks = [SeqChunk(i, p, 0, tables[i]) for i, p in enumerate(batch)]
    tokens = rt.step(chunks).argmax(dim=-1).tolist()
    pos = [len(p) for p in batch]
    t0 = time.perf_counter()
    for _ in range(steps):
        chunks = [SeqChunk(i, [tokens[i]], pos[i], tables[i]) for i in range(len(batch))]
        tokens = rt.step(chunks).argmax(dim=-1).tolist()
        pos = [p + 1 for p in pos]
    return len(batch) * steps / (time.perf_counter() - t0)


def engine_tps(engine: Engine, batch: list[list[int]], new_tokens: int) -> float:
    """Aggregate completion tokens/s of concurrent requests, from submitting them to the last
    token (their prefills included, so this understates decode speed a little)."""

    async def run() -> float:
        jobs = [Job([Choice(0, p, new_tokens, GREEDY)]) for p in batch]
        tokens = 0

        async def follow(job: Job) -> None:
            nonlocal tokens
            while not isinstance(event := await job.next_event(), End):
                if isinstance(event, Failed):
                    raise RuntimeError(event.message)
                if isinstance(event, Finish):
                    tokens += event.completion_tokens

        t0 = time.perf_counter()
        for job in jobs:
            engine.submit(job)
        await asyncio.gather(*(follow(job) for job in jobs))
        return tokens / (time.perf_counter() - t0)

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the B=1 decode steps")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--skip-engine", action="store_true", help="measure the runtime only")
    args = p.parse_args()
    if max(args.streams) > args.max_batch:
        p.error("--streams may not exceed --max-batch")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    mopts = ModelOptions(execution=ExecutionOptions(dtype=args.dtype, compile=args.compile))
    # Runtimes with the same weights: the B=1 path as `generate` runs it, one with a paged KV
    # pool, and the engine's own. Measurements alternate between them, so drifting machine load
    # affects each alike.
    single = random_runtime(args.shape, mopts, args.max_seq_len)
    paged = random_runtime(args.shape, mopts, args.max_seq_len)
    longest = args.prompt_tokens + args.new_tokens
    paged.setup_paged(args.block_size, max(args.streams) * -(-longest // args.block_size))
    batch = prompts(max(args.streams), args.prompt_tokens, single.args.vocab_size)
    steps = args.new_tokens
    runs: dict[str, Callable[[], float]] = {
        "B=1 path (generate), 1 stream": lambda: single_path_tps(single, batch[0], steps)
    }
    for k in args.streams:
        runs[f"runtime paged, {k} stream(s)"] = partial(paged_tps, paged, batch[:k], steps)
    engine = None
    if not args.skip_engine:
        served = random_runtime(args.shape, mopts, args.max_seq_len)
        engine = Engine(
            served,
            load_tokenizer(TOKENIZER),
            max_queue=64,
            max_batch=args.max_batch,
            block_size=args.block_size,
        )
        for k in args.streams:
            name = f"engine (server), {k} concurrent request(s)"
            runs[name] = partial(engine_tps, engine, batch[:k], steps)
    try:
        single_path_tps(single, batch[0], 4)  # warm up (and compile)
        paged_tps(paged, batch, 4)
        if engine is not None:
            engine_tps(engine, batch, 4)
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                samples[name].append(run())
        kv_bytes = engine.runtime.kv_cache_bytes() if engine is not None else 0
    finally:
        if engine is not None:
            engine.close()
    rows = [(name, statistics.median(values)) for name, values in samples.items()]
    setup = time.perf_counter() - t0
    print(
        f"Batched decode: {args.shape} (random weights, {args.dtype}), max-batch {args.max_batch}, "
        f"{'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {os.cpu_count()} cores; prompt {args.prompt_tokens} tokens, "
        f"{steps} decode steps, median of {args.repeats}; {setup:.0f} s in all"
    )
    print()
    print("| measurement | decode tok/s |")
    print("|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.1f} |")
    results = dict(rows)
    n = max(args.streams)
    one = results["B=1 path (generate), 1 stream"]
    print()
    for where in ("runtime paged", "engine (server)"):
        many = next((v for k, v in results.items() if k.startswith(where) and f" {n} " in k), None)
        alone = next((v for k, v in results.items() if k.startswith(where) and " 1 " in k), None)
        if many is not None:
            print(
                f"{where}: {n} streams = {many / one:.2f}x the B=1 path, {many / alone:.2f}x one paged stream"
            )
    if kv_bytes:
        a = single.args
        itemsize = 4 if args.dtype == "fp32" else 2
        per_position = 2 * a.n_layers * a.n_kv_heads * a.head_dim * itemsize  # keys and values
        slots = args.max_batch * args.max_seq_len * per_position
        print(
            f"engine KV memory after {n} streams of {args.prompt_tokens}+{steps} tokens: "
            f"{kv_bytes / 2**20:.1f} MiB (pool + one-sequence cache) = {kv_bytes / slots:.3f}x "
            f"per-slot rows ({args.max_batch} x {args.max_seq_len} positions, "
            f"{slots / 2**20:.1f} MiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
