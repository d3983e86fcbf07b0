"""`torchchat bench`: measure a model (real or random weights of a known shape) the same way
every time: prefill a prompt of random ids, decode greedily, repeat, report median/min/max."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from torchchat.builder import build_model, build_transformer, resolve_device, resolve_dtype
from torchchat.errors import TorchchatError
from torchchat.model.config import known_model_args, known_model_names
from torchchat.options import ModelOptions
from torchchat.quant.apply import quantize, structural
from torchchat.quant.config import load_quantize_spec
from torchchat.runtime.base import ModelRuntime
from torchchat.runtime.eager import EagerRuntime


@dataclass
class BenchOptions:
    shape: str | None = None  # known architecture to fill with random weights
    prompt_tokens: int = 64
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None


@dataclass
class BenchResult:
    label: str
    prefill_tps: list[float]
    decode_tps: list[float]
    ttft_s: list[float]
    weight_bytes: int
    peak_rss_mb: float
    setup_s: float  # build (+ quantize) + first compile

    def row(self) -> dict:
        med = statistics.median
        return {
            "model": self.label,
            "prefill tok/s": med(self.prefill_tps),
            "decode tok/s": med(self.decode_tps),
            "decode min": min(self.decode_tps),
            "decode max": max(self.decode_tps),
            "ttft ms": 1000 * med(self.ttft_s),
            "GB/s": self.weight_bytes * med(self.decode_tps) / 1e9,
            "weights MB": self.weight_bytes / 2**20,
            "peak RSS MB": self.peak_rss_mb,
            "setup s": self.setup_s,
        }


def random_runtime(shape: str, mopts: ModelOptions, max_seq_len: int) -> ModelRuntime:
    """A model of a known shape with random weights (N(0, 0.02)), quantized as asked."""
    if shape not in known_model_names():
        raise TorchchatError(f"unknown --shape {shape!r}; known: {', '.join(known_model_names())}")
    args = known_model_args(shape)
    device = resolve_device(mopts.device)
    schemes = load_quantize_spec(mopts.quantize) if mopts.quantize else []
    dtype_name = next((s.args["dtype"] for s in schemes if s.name == "precision"), mopts.dtype)
    dtype = resolve_dtype(dtype_name, device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        from torchchat.model.transformer import Transformer

        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {}
    for name, shp in shapes.items():
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(shp)
        else:
            sd[name] = torch.empty(shp).normal_(0, 0.02, generator=gen)
    model = build_transformer(args, sd, torch.float32 if structural(schemes) else dtype, device)
    if structural(schemes):
        quantize(model, schemes)
        model = model.to(dtype=dtype)
    return EagerRuntime(
        model, max_seq_len, compile=mopts.compile, compile_prefill=mopts.compile_prefill
    )


def measure(
    runtime: ModelRuntime, opts: BenchOptions
) -> tuple[list[float], list[float], list[float]]:
    """Prefill + greedy decode, `warmup` unrecorded runs then `repeats` recorded ones."""
    gen = torch.Generator().manual_seed(1)
    vocab = runtime.args.vocab_size
    prefill, decode, ttft = [], [], []
    for i in range(opts.warmup + opts.repeats):
        prompt = torch.randint(0, vocab, (1, opts.prompt_tokens), generator=gen)
        t0 = time.perf_counter()
        logits = runtime.prefill(prompt, 0)
        token = int(torch.argmax(logits))
        t1 = time.perf_counter()
        pos = opts.prompt_tokens
        for _ in range(opts.new_tokens - 1):
            logits = runtime.decode(torch.tensor([[token]]), pos)
            token = int(torch.argmax(logits))
            pos += 1
        t2 = time.perf_counter()
        if i >= opts.warmup:
            prefill.append(opts.prompt_tokens / (t1 - t0))
            decode.append((opts.new_tokens - 1) / (t2 - t1))
            ttft.append(t1 - t0)
    return prefill, decode, ttft


def run_bench(mopts: ModelOptions, opts: BenchOptions, label: str) -> BenchResult:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.prompt_tokens < 1 or opts.new_tokens < 2 or opts.repeats < 1:
        raise TorchchatError("bench needs --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1")
    max_seq = opts.prompt_tokens + opts.new_tokens
    t0 = time.perf_counter()
    if opts.shape:
        runtime = random_runtime(opts.shape, mopts, max_seq)
    else:
        exported = mopts.aoti_package_path or mopts.pte_path  # their cache size is fixed
        seq = mopts.max_seq_length if exported else max_seq
        runtime = build_model(ModelOptions(**{**asdict(mopts), "max_seq_length": seq})).runtime
    if max_seq > runtime.max_seq_len:
        raise TorchchatError(
            f"prompt + new tokens ({max_seq}) exceed the context {runtime.max_seq_len}"
        )
    with torch.inference_mode():
        measure(
            runtime,
            BenchOptions(prompt_tokens=opts.prompt_tokens, new_tokens=2, repeats=1, warmup=0),
        )
    setup = time.perf_counter() - t0
    prefill, decode, ttft = measure(runtime, opts)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return BenchResult(label, prefill, decode, ttft, runtime.weight_bytes, rss, setup)


def print_table(rows: list[dict], out=sys.stdout) -> None:
    cols = list(rows[0])
    fmt = [max(len(c), *(len(_cell(r[c])) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, fmt, strict=True)), file=out)
    print("-|-".join("-" * w for w in fmt), file=out)
    for r in rows:
        print(" | ".join(_cell(r[c]).ljust(w) for c, w in zip(cols, fmt, strict=True)), file=out)


def _cell(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def write_json(path: Path, rows: list[dict]) -> None:
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")
