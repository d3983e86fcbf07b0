"""`torchchat bench`: measure a model (real or random weights of a known shape) the same way
every time: prefill a prompt of random ids, decode greedily, repeat, report median/min/max.

`--compare llama.cpp` writes the same random weights to GGUF, runs them in llama.cpp with the same
threads, prompts and token counts, alternating torchchat and llama.cpp runs, and reports the
ratio torchchat / llama.cpp of each metric.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from torchchat import kernels
from torchchat.bench.bandwidth import read_bandwidth
from torchchat.bench.gguf_writer import gguf_weight_bytes, write_gguf
from torchchat.bench.llamacpp import LlamaCppWorker, llama_cpp_version, require_llama_cpp
from torchchat.builder import (
    build_model,
    make_runtime,
    model_from_checkpoint,
    quantized_model,
    recipe_settings,
    resolve_dtype,
)
from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs, known_model_args, known_model_names
from torchchat.options import ModelOptions, SourceOptions
from torchchat.quant.config import load_quantize_spec
from torchchat.runtime.base import ModelRuntime, peak_rss_mb

COMPARE_ENGINES = ("llama.cpp",)
# Metrics whose torchchat/llama.cpp ratio is reported (setup is not comparable: ours includes
# making the random weights, llama.cpp's only maps the file).
RATIO_METRICS = ("prefill tok/s", "decode tok/s", "ttft ms", "GB/s", "weights MB", "peak RSS MB")
HIDDEN_COLUMNS = ("probe GB/s",)  # in the JSON rows; the table prints it once above


@dataclass
class BenchOptions:
    shape: str | None = None  # known architecture to fill with random weights
    prompt_tokens: int = 64
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    compare: str | None = None  # "llama.cpp": run the same weights there too

    def __post_init__(self) -> None:
        if self.compare is not None and self.compare not in COMPARE_ENGINES:
            raise TorchchatError(f"--compare: unknown engine {self.compare!r} (known: llama.cpp)")


@dataclass
class BenchResult:
    label: str
    engine: str  # torchchat | llama.cpp
    prefill_tps: list[float]
    decode_tps: list[float]
    ttft_s: list[float]
    weight_bytes: int  # read per decoded token
    peak_rss_mb: float
    setup_s: float  # load (+ quantize), or llama.cpp's load
    compile_s: float | None = None  # first call of a compiled model: compile + one run
    probe_gbps: float | None = None  # the machine's read bandwidth, see bandwidth.py

    def record(self, prefill_s: float, decode_s: float, opts: BenchOptions) -> None:
        """One measured run: a prefill of opts.prompt_tokens, then opts.new_tokens - 1 decodes."""
        self.prefill_tps.append(opts.prompt_tokens / prefill_s)
        self.decode_tps.append((opts.new_tokens - 1) / decode_s)
        self.ttft_s.append(prefill_s)

    def row(self) -> dict:
        med = statistics.median
        gbps = self.weight_bytes * med(self.decode_tps) / 1e9
        return {
            "engine": self.engine,
            "model": self.label,
            "prefill tok/s": med(self.prefill_tps),
            "decode tok/s": med(self.decode_tps),
            "decode min": min(self.decode_tps),
            "decode max": max(self.decode_tps),
            "ttft ms": 1000 * med(self.ttft_s),
            "GB/s": gbps,
            "% of bw": 100 * gbps / self.probe_gbps if self.probe_gbps else None,
            "weights MB": self.weight_bytes / 2**20,
            "peak RSS MB": self.peak_rss_mb,
            "setup s": self.setup_s,
            "compile s": self.compile_s,
            "probe GB/s": self.probe_gbps,
        }


@dataclass
class BenchReport:
    """torchchat's result, then llama.cpp's (one per GGUF type) when compared."""

    results: list[BenchResult]
    threads: int
    probe_gbps: float
    versions: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per result, then a torchchat/llama.cpp ratio row per llama.cpp result."""
        rows = [r.row() for r in self.results]
        ours = rows[0]
        for other in rows[1:]:
            gguf_type = other["model"].split()[-1]
            ratio = {"engine": "ratio", "model": f"torchchat/llama.cpp {gguf_type}"}
            for k in RATIO_METRICS:
                ratio[k] = ours[k] / other[k] if ours[k] and other[k] else None
            rows.append(ratio)
        return rows


def random_weights(
    args: ModelArgs, seed: int = 0, each: Callable[[str, Tensor], Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """fp32 weights for args in native names: N(0, 0.02), norms at 1. `each(name, tensor)`, when
    given, replaces every random tensor as soon as it is drawn (e.g. by one rank's slice of it,
    so the whole model is never held)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        from torchchat.model.transformer import Transformer

        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {}
    for name, shp in shapes.items():
        if name == "output.weight" and args.tie_embeddings:
            sd[name] = sd["tok_embeddings.weight"]
        elif name.endswith("norm.weight"):
            sd[name] = torch.ones(shp)
        else:
            t = torch.empty(shp).normal_(0, 0.02, generator=gen)
            sd[name] = each(name, t) if each is not None else t
    return sd


def shape_args(shape: str) -> ModelArgs:
    if shape not in known_model_names():
        raise TorchchatError(f"unknown --shape {shape!r}; known: {', '.join(known_model_names())}")
    return known_model_args(shape)


def random_runtime(
    shape: str, mopts: ModelOptions, max_seq_len: int, sd: dict[str, torch.Tensor] | None = None
) -> ModelRuntime:
    """A model of a known shape with random weights (`random_weights` unless sd is given),
    quantized as asked."""
    schemes, dtype_name, device = recipe_settings(mopts.quantization, mopts.execution)
    dtype = resolve_dtype(dtype_name, device, torch.float32)
    args = shape_args(shape)
    model = quantized_model(
        args, random_weights(args) if sd is None else sd, schemes, dtype, device
    )
    return make_runtime(model, max_seq_len, mopts.execution, mopts.distribution)


def gguf_types(mopts: ModelOptions) -> list[str]:
    """The GGUF file types that match a torchchat precision: fp32 -> F32, bf16 -> BF16 and F16,
    fp16 -> F16, linear:int8 -> Q8_0, linear:int4 and 8da4w -> Q4_0."""
    recipe = mopts.quantization.recipe
    schemes = load_quantize_spec(recipe) if recipe else []
    linear = [s.name for s in schemes if s.name.startswith("linear:")]
    if linear == ["linear:int8"]:
        return ["Q8_0"]
    if linear in (["linear:int4"], ["linear:a8w4dq"]):
        return ["Q4_0"]
    if linear:
        raise TorchchatError(f"--compare llama.cpp: no GGUF type matches {', '.join(linear)}")
    dtype = next((s.args["dtype"] for s in schemes if s.name == "precision"), mopts.execution.dtype)
    types = {None: ["F32"], "fp32": ["F32"], "bf16": ["BF16", "F16"], "fp16": ["F16"]}
    if dtype not in types:
        raise TorchchatError(f"--compare llama.cpp: no GGUF type matches dtype {dtype}")
    return types[dtype]


def write_ggufs(args: ModelArgs, sd: dict[str, torch.Tensor], paths: dict[str, Path]) -> None:
    """Write sd once per file type, in a forked child: its memory never counts in our peak RSS.

    The child only runs numpy (gguf's quantizers), which is safe after fork."""
    _in_child(multiprocessing.get_context("fork"), _write_ggufs, args, sd, paths)


def write_random_checkpoint(args: ModelArgs, path: Path, ggufs: dict[str, Path]) -> None:
    """`random_weights(args)` saved as a checkpoint at path and as each GGUF of `ggufs`, by a
    spawned child: the float weights never count in our peak RSS, and the bench then loads them
    as a user's checkpoint loads (mapped, converted or quantized tensor by tensor)."""
    _in_child(multiprocessing.get_context("spawn"), _write_random, args, path, ggufs)


def _write_ggufs(args: ModelArgs, sd: dict[str, torch.Tensor], paths: dict[str, Path]) -> None:
    for file_type, path in paths.items():
        write_gguf(path, args, sd, file_type)


def _write_random(args: ModelArgs, path: Path, ggufs: dict[str, Path]) -> None:
    sd = random_weights(args)
    torch.save(sd, path)
    _write_ggufs(args, sd, ggufs)


def _child(send, fn: Callable, *fn_args) -> None:
    try:
        fn(*fn_args)
        send.send(None)
    except TorchchatError as e:
        send.send(str(e))
    except (OSError, RuntimeError) as e:  # a full or missing temporary folder (torch.save)
        send.send(f"the bench cannot write its weights: {str(e).splitlines()[0]}")


def _in_child(ctx, fn: Callable, *fn_args) -> None:
    """fn(*fn_args) in a child process of context ctx; its TorchchatError raised here."""
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, *fn_args))
    proc.start()
    send.close()
    try:
        error = receive.recv()
    except EOFError:
        error = "the bench's weight writer died"
    proc.join()
    if error:
        raise TorchchatError(error)


def run_once(
    runtime: ModelRuntime, prompt: list[int], new_tokens: int
) -> tuple[float, float, list[int]]:
    """Prefill prompt, decode new_tokens - 1 more greedily: prefill s, decode s (argmax
    included) and the new tokens."""
    t0 = time.perf_counter()
    tokens = [int(torch.argmax(runtime.prefill(torch.tensor([prompt]), 0)))]
    t1 = time.perf_counter()
    for i in range(new_tokens - 1):
        logits = runtime.decode(torch.tensor([[tokens[-1]]]), len(prompt) + i)
        tokens.append(int(torch.argmax(logits)))
    return t1 - t0, time.perf_counter() - t1, tokens


def first_call(runtime: ModelRuntime, prompt: list[int], mopts: ModelOptions) -> float | None:
    """Run one short generation (which compiles, when compiled); its seconds if compiled."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        run_once(runtime, prompt, 2)
    compiled = mopts.execution.compile or mopts.execution.compile_prefill
    return time.perf_counter() - t0 if compiled else None


def random_prompts(vocab_size: int, length: int, count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


def run_bench(mopts: ModelOptions, opts: BenchOptions, label: str) -> BenchReport:
    """Measure torchchat (and llama.cpp when opts.compare says so) on the same prompts."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    if opts.prompt_tokens < 1 or opts.new_tokens < 2 or opts.repeats < 1:
        raise TorchchatError("bench needs --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1")
    source = _source_gguf(mopts) if opts.compare else None
    if opts.compare and not (opts.shape or source):
        raise TorchchatError(
            "--compare llama.cpp needs --shape (random weights of a shape) or a GGUF file"
        )
    file_types = [] if source else _compared_gguf_types(mopts, opts)
    versions = {"torch": torch.__version__, "torchchat CPU kernels": kernels.describe()}
    with tempfile.TemporaryDirectory(prefix="torchchat-bench-") as tmp:
        paths = {t: Path(tmp) / f"{opts.shape}-{t}.gguf" for t in file_types}
        runtime, setup = _build(mopts, opts, paths, Path(tmp))
        if source is not None:  # a GGUF file: llama.cpp runs the very same file
            require_llama_cpp()
            paths = {"same file": source}
        prompts = random_prompts(
            runtime.args.vocab_size, opts.prompt_tokens, 1 + opts.warmup + opts.repeats
        )
        ours = BenchResult(label, "torchchat", [], [], [], runtime.weight_bytes, 0.0, setup,
                           first_call(runtime, prompts[0], mopts))  # fmt: skip
        results, workers = [ours], []
        try:
            for file_type, path in paths.items():
                versions["llama-cpp-python"] = llama_cpp_version()
                # Same threads for prefill and decode; n_batch = the prompt: one prefill batch.
                workers.append(LlamaCppWorker(path, threads, opts.prompt_tokens + opts.new_tokens,
                                              opts.prompt_tokens))  # fmt: skip
                name = path.name if source else f"{opts.shape} {file_type}"
                results.append(BenchResult(name, "llama.cpp", [], [], [],
                                           gguf_weight_bytes(path), 0.0, workers[-1].setup_s))  # fmt: skip
            for i, prompt in enumerate(prompts[1:]):
                # A B A B ...: drift in the machine's speed hits both engines alike.
                with torch.inference_mode():
                    times = [run_once(runtime, prompt, opts.new_tokens)[:2]]
                for w in workers:
                    run = w.run(prompt, opts.new_tokens)
                    times.append((run.prefill_s, run.decode_s))
                if i >= opts.warmup:
                    for r, (prefill_s, decode_s) in zip(results, times, strict=True):
                        r.record(prefill_s, decode_s, opts)
            ours.peak_rss_mb = peak_rss_mb()
            for r, w in zip(results[1:], workers, strict=True):
                r.peak_rss_mb = w.close()
        finally:
            for w in workers:
                w.kill()
    del runtime
    probe = read_bandwidth(threads)  # after the RSS reading: its buffer is not the model's
    for r in results:
        r.probe_gbps = probe
    return BenchReport(results, threads, probe, versions)


def _source_gguf(mopts: ModelOptions) -> Path | None:
    """The model's file if it is a GGUF (llama.cpp then runs that file), else None."""
    src = mopts.source
    path = src.gguf_path or src.checkpoint_path or (Path(src.model) if src.model else None)
    if path is None or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        return Path(path) if f.read(4) == b"GGUF" else None


def _compared_gguf_types(mopts: ModelOptions, opts: BenchOptions) -> list[str]:
    """The GGUF types llama.cpp runs for --compare (none without it)."""
    if not opts.compare:
        return []
    require_llama_cpp()
    return gguf_types(mopts)


def _build(
    mopts: ModelOptions, opts: BenchOptions, gguf_paths: dict[str, Path], tmp: Path
) -> tuple[ModelRuntime, float]:
    """The runtime to measure and its setup time: a checkpoint's load (and quantization), for
    --shape of random weights written first to a checkpoint in tmp (with the GGUF files for
    llama.cpp, by a child process: neither counts, in time or in peak RSS)."""
    max_seq = opts.prompt_tokens + opts.new_tokens
    execution = mopts.execution  # an exported program's cache size is fixed
    if not mopts.source.exported:
        execution = replace(execution, max_seq_length=max_seq)
    if opts.shape:
        checkpoint = tmp / f"{opts.shape}.pth"
        write_random_checkpoint(shape_args(opts.shape), checkpoint, gguf_paths)
        source = SourceOptions(checkpoint_path=checkpoint, params_table=opts.shape)
        mopts = replace(mopts, source=source, execution=execution)
        t0 = time.perf_counter()
        model, _, _ = model_from_checkpoint(mopts)
        runtime = make_runtime(model, max_seq, execution, mopts.distribution)
    else:
        t0 = time.perf_counter()
        runtime = build_model(replace(mopts, execution=execution)).runtime
    setup = time.perf_counter() - t0
    if max_seq > runtime.max_seq_len:
        raise TorchchatError(
            f"prompt + new tokens ({max_seq}) exceed the context {runtime.max_seq_len}"
        )
    return runtime, setup


def print_table(rows: list[dict], out=sys.stdout) -> None:
    cols = [c for c in rows[0] if c not in HIDDEN_COLUMNS]
    fmt = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, fmt, strict=True)), file=out)
    print("-|-".join("-" * w for w in fmt), file=out)
    for r in rows:
        print(
            " | ".join(_cell(r.get(c)).ljust(w) for c, w in zip(cols, fmt, strict=True)), file=out
        )


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_json(path: Path, rows: list[dict]) -> None:
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")
