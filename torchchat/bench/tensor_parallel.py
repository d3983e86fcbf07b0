"""`torchchat bench --tp N`: rank 0 measures as `torchchat bench` does while the other ranks
follow; the result adds every rank's peak RSS. Random weights (--shape) are made one tensor at a
time and sliced at once, so no rank ever holds the whole model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from torchchat.bench.bandwidth import read_bandwidth
from torchchat.bench.run import (
    BenchOptions,
    BenchReport,
    BenchResult,
    first_call,
    random_prompts,
    random_weights,
    run_once,
    shape_args,
)
from torchchat.builder import (
    build_model,
    make_runtime,
    quantized_model,
    recipe_settings,
    resolve_dtype,
    tensor_parallel_sharding,
)
from torchchat.distributed.sharding import Sharding
from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs
from torchchat.model.transformer import Transformer
from torchchat.options import ModelOptions


@dataclass
class TensorParallelBenchResult(BenchResult):
    rss_per_rank: list[float] = field(default_factory=list)  # peak RSS MB, rank 0 first

    def row(self) -> dict:
        row = super().row()
        row["peak RSS MB per rank"] = " / ".join(f"{mb:.0f}" for mb in self.rss_per_rank)
        return row


def random_shard(args: ModelArgs, sharding: Sharding, seed: int = 0) -> dict[str, torch.Tensor]:
    """This rank's slices of `bench.run.random_weights(args, seed)`, each full tensor dropped as
    soon as it is sliced."""
    return random_weights(args, seed, each=sharding.tensor)


def random_model(shape: str, mopts: ModelOptions) -> Transformer:
    """This rank's share of `bench --shape` random weights, quantized as asked (all ranks)."""
    schemes, dtype_name, device = recipe_settings(mopts.quantization, mopts.execution)
    dtype = resolve_dtype(dtype_name, device, torch.float32)
    args = shape_args(shape)
    sharding = tensor_parallel_sharding(mopts, args, device, schemes, [])
    return quantized_model(
        args, random_shard(args, sharding), schemes, dtype, device, sharding=sharding
    )


def run_bench(mopts: ModelOptions, opts: BenchOptions, label: str) -> BenchReport:
    """`bench.run.run_bench` on rank 0 of --tp N (the other ranks run `runtime.follow`)."""
    if opts.compare:
        raise TorchchatError("--compare runs one process: drop --tp")
    if opts.threads:
        torch.set_num_threads(opts.threads)  # the other ranks take it from rank 0
    threads = torch.get_num_threads()
    if opts.prompt_tokens < 1 or opts.new_tokens < 2 or opts.repeats < 1:
        raise TorchchatError("bench needs --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1")
    if mopts.source.exported:
        raise TorchchatError("--tp shards a checkpoint, not an exported program")
    max_seq = opts.prompt_tokens + opts.new_tokens
    t0 = time.perf_counter()
    if opts.shape:
        model = random_model(opts.shape, mopts)
        runtime = make_runtime(model, max_seq, mopts.execution, mopts.distribution)
    else:
        execution = replace(mopts.execution, max_seq_length=max_seq)
        runtime = build_model(replace(mopts, execution=execution)).runtime
    setup = time.perf_counter() - t0
    if max_seq > runtime.max_seq_len:
        raise TorchchatError(
            f"prompt + new tokens ({max_seq}) exceed the context {runtime.max_seq_len}"
        )
    prompts = random_prompts(
        runtime.args.vocab_size, opts.prompt_tokens, 1 + opts.warmup + opts.repeats
    )
    result = TensorParallelBenchResult(
        f"{label} tp{mopts.distribution.tp}", "torchchat", [], [], [], runtime.weight_bytes, 0.0, setup,
        first_call(runtime, prompts[0], mopts),
    )  # fmt: skip
    for i, prompt in enumerate(prompts[1:]):
        with torch.inference_mode():
            prefill_s, decode_s, _ = run_once(runtime, prompt, opts.new_tokens)
        if i >= opts.warmup:
            result.record(prefill_s, decode_s, opts)
    result.rss_per_rank = runtime.peak_rss_per_rank()
    result.peak_rss_mb = max(result.rss_per_rank)
    del runtime
    result.probe_gbps = read_bandwidth(threads)
    return BenchReport([result], threads, result.probe_gbps, {"torch": torch.__version__})
