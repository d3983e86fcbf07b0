"""Command line: parse verbs into option objects, run them, turn TorchchatError into one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from torchchat.errors import TorchchatError
from torchchat.generate.generator import format_metrics
from torchchat.options import (
    ChatOptions,
    DistributionOptions,
    ExecutionOptions,
    GenerateOptions,
    ModelOptions,
    QuantizeOptions,
    SamplingOptions,
    SourceOptions,
    SpeculationOptions,
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", help="checkpoint path (file or folder), alias or downloaded model name"
    )
    p.add_argument("--checkpoint-path", type=Path)
    p.add_argument(
        "--gguf-dequantize",
        action="store_true",
        help="dequantize a GGUF's blocks to floats at load (default: run them in their own "
        "encoding on the CPU kernels)",
    )
    p.add_argument("--aoti-package-path", type=Path, help="run an exported AOT Inductor package")
    p.add_argument("--pte-path", type=Path, help="run an exported ExecuTorch program")
    p.add_argument("--gguf-path", type=Path)
    p.add_argument("--params-path", type=Path, help="model config JSON (ModelArgs fields)")
    p.add_argument("--params-table", help="name of a known model config")
    p.add_argument("--tokenizer-path", type=Path)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fast"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "fast"])
    p.add_argument(
        "--max-seq-length", type=int, help="KV cache positions (default: min(context, 4096))"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (where the fused CPU step does not run)",
    )
    p.add_argument("--compile-prefill", action="store_true", help="torch.compile prefill too")
    p.add_argument(
        "--no-fused-decode",
        dest="fused_decode",
        action="store_false",
        help="decode through the model's modules (compiled with --compile) instead of "
        "torchchat's fused CPU step",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks: run under `torchrun --nproc-per-node N -m torchchat`",
    )
    p.add_argument("--quantize", help="quantization recipe: JSON, a JSON file, or a profile name")
    p.add_argument("--calibration-file", type=Path, help="text file to calibrate GPTQ on")
    p.add_argument("--calibration-tasks", help="lm-eval tasks (comma list) to calibrate GPTQ on")
    p.add_argument("--calibration-tasks-path", type=Path, help="folder of local task YAMLs")
    p.add_argument("--calibration-limit", type=int, help="documents per calibration task")
    p.add_argument(
        "--draft-checkpoint-path", type=Path, help="draft model for speculative decoding"
    )
    p.add_argument("--draft-quantize", help="draft with a copy of this model quantized so (JSON)")
    p.add_argument("--speculate-k", type=int, default=5, help="draft tokens per speculative step")
    _add_model_dir_arg(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no metrics on stderr")


def _add_model_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-directory",
        type=Path,
        help="where downloaded models live (default: $TORCHCHAT_MODELDIR or ~/.torchchat/models)",
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_new_default: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_default)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchchat", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    g = sub.add_parser("generate", help="complete one prompt, streaming text to stdout")
    _add_model_args(g)
    _add_sampling_args(g, 200)
    g.add_argument("--prompt", default="", help='prompt text ("" = start from BOS)')
    g.add_argument("--num-samples", type=int, default=1)

    c = sub.add_parser("chat", help="interactive chat (reads turns from stdin)")
    _add_model_args(c)
    _add_sampling_args(c, 1024)
    c.add_argument("--system-prompt")
    c.add_argument(
        "--chat-template", help="llama2, llama3, chatml or hf (default: from the tokenizer)"
    )

    v = sub.add_parser("convert", help="write any checkpoint as a native checkpoint + tokenizer")
    _add_model_args(v)
    v.add_argument("--output", type=Path, required=True, help="output folder")

    e = sub.add_parser("eval", help="perplexity on WikiText and lm-evaluation-harness tasks")
    _add_model_args(e)
    e.add_argument("--tasks", default="wikitext", help="comma list: wikitext and/or lm-eval tasks")
    e.add_argument("--dataset-path", type=Path, help="raw WikiText file for wikitext")
    e.add_argument("--tasks-path", type=Path, help="folder of local lm-eval task YAMLs")
    e.add_argument("--limit", type=int, help="first N documents / examples of each task")
    e.add_argument("--num-fewshot", type=int, help="few-shot examples for lm-eval tasks")
    e.add_argument(
        "--add-bos",
        action=argparse.BooleanOptionalAction,
        help="start documents with BOS (default: as the tokenizer's own default encoding)",
    )
    e.add_argument("--output-json", type=Path, help="also write the results here")

    b = sub.add_parser("bench", help="measure prefill/decode speed, time to first token, memory")
    _add_model_args(b)
    b.add_argument("--shape", help="random weights of a known architecture (e.g. stories110M)")
    b.add_argument("--prompt-tokens", type=int, default=64)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    b.add_argument(
        "--compare",
        choices=["llama.cpp"],
        help="also run the same random weights (as GGUF) in llama.cpp; print torchchat/llama.cpp",
    )
    b.add_argument("--json", type=Path, help="also write the results here")

    x = sub.add_parser("export", help="export to an AOT Inductor package and/or ExecuTorch program")
    _add_model_args(x)
    x.add_argument(
        "--output-aoti-package-path", type=Path, help="write an AOT Inductor .pt2 package"
    )
    x.add_argument("--output-pte-path", type=Path, help="write an ExecuTorch .pte program")
    x.add_argument("--output-dso-path", type=Path, help="(not available in torch 2.13: use .pt2)")

    q = sub.add_parser("quantize", help="quantize a model and save it for fast reloads")
    _add_model_args(q)
    q.add_argument("--output", type=Path, required=True, help="output folder")

    d = sub.add_parser("download", help="fetch a model from the Hugging Face hub")
    d.add_argument("model", help="alias, model name or Hugging Face repo ORG/NAME")
    _add_model_dir_arg(d)
    d.add_argument("--hf-token", help="Hugging Face token for gated repos (default: $HF_TOKEN)")
    d.add_argument(
        "--no-convert", action="store_true", help="keep the files as published (no native copy)"
    )
    ls = sub.add_parser("list", help="known and downloaded models")
    _add_model_dir_arg(ls)
    ls.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    w = sub.add_parser("where", help="print the folder of a downloaded model")
    w.add_argument("model", help="alias or model name")
    _add_model_dir_arg(w)
    r = sub.add_parser("remove", help="delete a downloaded model")
    r.add_argument("model", help="alias or model name")
    _add_model_dir_arg(r)
    t = sub.add_parser(
        "tokenizer-export", help="write a tokenizer as the C++ runners' file (aoti_run/et_run -z)"
    )
    t.add_argument("tokenizer", type=Path, help="a tokenizer file or folder torchchat loads")
    t.add_argument("--output", type=Path, required=True, help="the runner tokenizer file to write")

    for verb, help_text in (
        ("server", "serve the model over an OpenAI-compatible HTTP API (and a chat page at /)"),
        ("browser", "serve the model and open its chat page in the web browser"),
    ):
        srv = sub.add_parser(verb, help=help_text)
        _add_model_args(srv)
        _add_server_args(srv)
    return parser


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` (default: $TORCHCHAT_API_KEY)"
    )
    p.add_argument(
        "--cors-origins", help="comma list of browser origins allowed (default: localhost; * = any)"
    )
    p.add_argument(
        "--allowed-hosts", help="comma list of extra Host header names accepted (* = any)"
    )
    p.add_argument(
        "--model-id", help="the model name the API reports (default: from the checkpoint)"
    )
    p.add_argument(
        "--chat-template", help="llama2, llama3, chatml or hf (default: from the tokenizer)"
    )
    p.add_argument(
        "--max-queue", type=int, default=16, help="requests waiting before 503 (default 16)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="choices generated together, each step computing only theirs (default 8; "
        "1: one at a time)",
    )
    p.add_argument(
        "--kv-blocks",
        type=int,
        help="most blocks the paged KV cache grows to (default: max-batch full contexts); it "
        "starts empty and grows with the tokens in use",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=16,
        help="positions per KV block; prompts sharing whole blocks share their cache (default 16)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=32,
        help="prompt tokens computed per step while other choices decode, so a long prompt "
        "does not stall them (default 32; with none decoding, or at most this many tokens "
        "left, a prompt goes whole)",
    )
    p.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="most tokens a completion may ask for"
    )
    p.add_argument("--max-n", type=int, default=8, help="most choices per request (n)")
    p.add_argument(
        "--max-prompt-chars", type=int, help="prompt characters accepted (default: 32 x context)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=2 * 1024 * 1024, help="larger bodies get 413"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def resolve_model(model: str | None, model_directory: Path | None) -> str | None:
    """The positional MODEL as a path: an existing path, else an alias or a downloaded model's
    name, looked up in the model directory (torchchat/hub)."""
    if model is None or Path(model).expanduser().exists():
        return model
    from torchchat.hub import store

    return str(store.find_downloaded(model, store.model_directory(model_directory)))


def model_options(a: argparse.Namespace) -> ModelOptions:
    """The model flags, by concern: each option group takes the flags named as its fields."""
    return ModelOptions(
        source=_parsed(SourceOptions, a, model=resolve_model(a.model, a.model_directory)),
        quantization=_parsed(QuantizeOptions, a, recipe=a.quantize),
        execution=_parsed(ExecutionOptions, a),
        speculation=_parsed(SpeculationOptions, a),
        distribution=_parsed(DistributionOptions, a),
    )


def _parsed(cls, a: argparse.Namespace, **given):
    """An option dataclass from the parsed flags of its fields' names (and `given`)."""
    flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if f.name not in given}
    return cls(**flags, **given)


def sampling_options(a: argparse.Namespace) -> SamplingOptions:
    try:
        return SamplingOptions(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    except ValueError as e:
        raise TorchchatError(str(e)) from None


def report(metrics, runtime, quiet: bool, cached: int = 0) -> None:
    """The metrics line, on stderr."""
    if not quiet:
        print(format_metrics(metrics, runtime, cached), file=sys.stderr)


def run_generate(a: argparse.Namespace) -> None:
    from torchchat.builder import build_model
    from torchchat.generate.generator import Generator, Result

    opts = GenerateOptions(
        prompt=a.prompt,
        max_new_tokens=a.max_new_tokens,
        num_samples=a.num_samples,
        stop=tuple(a.stop),
        sampling=sampling_options(a),
    )
    if opts.max_new_tokens < 1 or opts.num_samples < 1:
        raise TorchchatError("--max-new-tokens and --num-samples must be at least 1")
    built = build_model(model_options(a), verbose=a.verbose)
    tok = built.tokenizer
    if tok.bos_id is None and not opts.prompt:
        raise TorchchatError("empty prompt and the tokenizer has no BOS token: give --prompt")
    prompt = tok.encode(opts.prompt, bos=tok.bos_id is not None)
    gen = Generator(built.runtime, tok, built.speculator)
    for i in range(opts.num_samples):
        seed = None if opts.sampling.seed is None else opts.sampling.seed + i
        sampling = SamplingOptions(
            opts.sampling.temperature, opts.sampling.top_k, opts.sampling.top_p, seed
        )
        res = Result()
        for piece in gen.stream_reusing_prefix(
            prompt,
            max_new_tokens=opts.max_new_tokens,
            sampling=sampling,
            stop_strings=opts.stop,
            result=res,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        report(res.metrics, built.runtime, a.quiet, cached=res.metrics.cached_tokens)


def run_chat(a: argparse.Namespace) -> None:
    from torchchat.builder import build_model
    from torchchat.chat.session import ChatSession, ContextFull
    from torchchat.chat.templates import choose_template

    opts = ChatOptions(
        system_prompt=a.system_prompt,
        chat_template=a.chat_template,
        max_new_tokens=a.max_new_tokens,
        stop=tuple(a.stop),
        sampling=sampling_options(a),
    )
    built = build_model(model_options(a), verbose=a.verbose)
    template = choose_template(opts.chat_template, built.tokenizer, built.tokenizer.chat_template)
    session = ChatSession(built.runtime, built.tokenizer, template, opts, built.speculator)
    interactive = sys.stdin.isatty()
    print(f"chat template {template.name}; /bye to quit, /reset to start over", file=sys.stderr)
    while True:
        if interactive:
            print("User: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/bye":
            break
        if text.strip() == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextFull as e:
            print(str(e), file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        report(session.last.metrics, built.runtime, a.quiet, cached=session.last_cached)


def run_convert(a: argparse.Namespace) -> None:
    from torchchat.convert import convert

    convert(model_options(a), a.output, verbose=a.verbose)


def run_bench(a: argparse.Namespace) -> None:
    from torchchat.bench.run import BenchOptions, print_table, run_bench, write_json

    if a.tp > 1:  # rank 0 of --tp: same measurements, every rank's memory
        from torchchat.bench.tensor_parallel import run_bench

    if not (
        a.shape or a.model or a.checkpoint_path or a.gguf_path or a.aoti_package_path or a.pte_path
    ):
        raise TorchchatError("bench needs a model: --shape NAME (random weights) or a checkpoint")
    opts = BenchOptions(
        a.shape, a.prompt_tokens, a.new_tokens, a.repeats, threads=a.threads, compare=a.compare
    )
    source = a.model or a.checkpoint_path or a.gguf_path or a.aoti_package_path or a.pte_path
    parts = [a.shape or str(source), a.dtype or "default"]
    parts += [a.quantize] if a.quantize else []
    parts += ["compile"] if a.compile else []
    parts += [] if a.fused_decode else ["unfused"]
    report = run_bench(model_options(a), opts, " ".join(parts))
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    print(f"memory read bandwidth (probe, {report.threads} threads): {report.probe_gbps:.1f} GB/s; "
          f"{versions}")  # fmt: skip
    rows = report.rows()
    print_table(rows)
    if a.json:
        write_json(a.json, rows)


def run_export(a: argparse.Namespace) -> None:
    from torchchat.export.run import ExportOptions, run_export

    eopts = ExportOptions(a.output_aoti_package_path, a.output_pte_path, a.output_dso_path)
    run_export(model_options(a), eopts, verbose=a.verbose)


def run_quantize(a: argparse.Namespace) -> None:
    if not a.quantize:
        raise TorchchatError("quantize needs --quantize JSON|FILE|PROFILE")
    run_convert(a)


def run_download(a: argparse.Namespace) -> None:
    from torchchat.hub.download import download
    from torchchat.hub.store import model_directory

    model_dir = model_directory(a.model_directory)
    download(a.model, model_dir, token=a.hf_token, convert=not a.no_convert)


def run_list(a: argparse.Namespace) -> None:
    from torchchat.hub.store import format_table, list_models, model_directory

    model_dir = model_directory(a.model_directory)
    rows = list_models(model_dir)
    if a.json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
    else:
        print(format_table(rows))
        print(f"model directory: {model_dir}", file=sys.stderr)


def run_where(a: argparse.Namespace) -> None:
    from torchchat.hub.store import locate, model_directory

    print(locate(a.model, model_directory(a.model_directory)))


def run_remove(a: argparse.Namespace) -> None:
    from torchchat.hub.store import format_size, model_directory, remove_model

    folder, size = remove_model(a.model, model_directory(a.model_directory))
    print(f"removed {folder} ({format_size(size)})", file=sys.stderr)


def run_eval(a: argparse.Namespace) -> None:
    from torchchat.builder import build_model
    from torchchat.eval.runner import EvalOptions, evaluate, format_table, prepare
    from torchchat.eval.runner import write_json as write_eval_json
    from torchchat.tasks import parse_tasks

    opts = EvalOptions(
        tasks=parse_tasks(a.tasks),
        dataset_path=a.dataset_path,
        tasks_path=a.tasks_path,
        limit=a.limit,
        num_fewshot=a.num_fewshot,
        add_bos=a.add_bos,
        show_progress=not a.quiet,
        verbose=a.verbose,
    )
    plan = prepare(opts)  # bad tasks or data fail before the model loads
    built = build_model(model_options(a), verbose=a.verbose)
    report = evaluate(plan, built.runtime, built.tokenizer)
    print(format_table(report.results))
    if a.output_json:
        config = {**vars(opts), "max_seq_length": built.runtime.max_seq_len}
        config["model"] = str(a.model or a.checkpoint_path or a.gguf_path)
        write_eval_json(report, a.output_json, config)


def run_server(a: argparse.Namespace, open_browser: bool = False) -> None:
    import os

    from torchchat.server.config import ServerOptions, model_id_for
    from torchchat.server.run import API_KEY_ENV, serve

    def comma_list(value: str | None) -> tuple[str, ...]:
        return tuple(v.strip() for v in (value or "").split(",") if v.strip())

    source = a.model or a.checkpoint_path or a.gguf_path or a.aoti_package_path or a.pte_path
    opts = ServerOptions(
        host=a.host,
        port=a.port,
        api_key=a.api_key or os.environ.get(API_KEY_ENV) or None,
        cors_origins=comma_list(a.cors_origins),
        allowed_hosts=comma_list(a.allowed_hosts),
        model_id=a.model_id or model_id_for(str(source or "torchchat")),
        chat_template=a.chat_template,
        max_queue=a.max_queue,
        max_batch=a.max_batch,
        kv_blocks=a.kv_blocks,
        block_size=a.block_size,
        prefill_chunk=a.prefill_chunk,
        max_tokens_limit=a.max_tokens_limit,
        max_n=a.max_n,
        max_prompt_chars=a.max_prompt_chars,
        max_body_bytes=a.max_body_bytes,
        threads=a.threads,
    )
    serve(model_options(a), opts, verbose=a.verbose, open_browser=open_browser)


def run_tokenizer_export(a: argparse.Namespace) -> None:
    from torchchat.files import atomic_file
    from torchchat.tokenizer import load_tokenizer
    from torchchat.tokenizer.runner_format import runner_tokenizer_bytes

    tok = load_tokenizer(a.tokenizer)
    data = runner_tokenizer_bytes(tok)
    with atomic_file(a.output) as tmp:
        tmp.write_bytes(data)
    print(f"wrote {a.output} ({tok.kind}, {tok.vocab_size} tokens)", file=sys.stderr)


VERBS = {
    "generate": run_generate,
    "chat": run_chat,
    "convert": run_convert,
    "eval": run_eval,
    "quantize": run_quantize,
    "bench": run_bench,
    "export": run_export,
    "download": run_download,
    "list": run_list,
    "where": run_where,
    "remove": run_remove,
    "tokenizer-export": run_tokenizer_export,
    "server": lambda a: run_server(a),
    "browser": lambda a: run_server(a, open_browser=True),
}


# --- tensor parallelism (--tp N): rank 0 runs the verb, the other ranks follow its calls ---
TENSOR_PARALLEL_VERBS = ("generate", "chat", "eval", "bench", "server", "browser")


def run_tensor_parallel(a: argparse.Namespace) -> None:
    """Every rank builds its share of the model; rank 0 runs the verb, the others follow it."""
    from torchchat.builder import model_from_checkpoint, resolve_device
    from torchchat.distributed.group import run_ranks
    from torchchat.distributed.runtime import follow

    if a.verb not in TENSOR_PARALLEL_VERBS:
        raise TorchchatError(f"--tp applies to {', '.join(TENSOR_PARALLEL_VERBS)}, not {a.verb}")
    if a.aoti_package_path or a.pte_path:
        raise TorchchatError("--tp shards a checkpoint, not an exported program")

    def follow_rank0(group) -> None:  # this rank's share of the model rank 0 builds
        opts = model_options(a)
        if a.verb == "bench" and a.shape:
            from torchchat.bench.tensor_parallel import random_model

            model = random_model(a.shape, opts)
        else:
            model, _, _ = model_from_checkpoint(opts)
        run = opts.execution
        follow(model, group, compile=run.compile, compile_prefill=run.compile_prefill)

    run_ranks(a.tp, resolve_device(a.device), lambda: VERBS[a.verb](a), follow_rank0)


# -------------------------------------------------------------------------------------------


# Verbs that may run torch.compile / Inductor: their compiled kernels persist across processes.
COMPILING_VERBS = ("generate", "chat", "eval", "bench", "export", "server", "browser")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `torchchat` console script."""
    args = build_parser().parse_args(argv)
    if args.verb in COMPILING_VERBS:
        from torchchat.compile_cache import enable_compile_cache

        enable_compile_cache()
    try:
        if "tp" in args and args.tp != 1:
            run_tensor_parallel(args)
        else:
            VERBS[args.verb](args)
    except TorchchatError as e:
        print(f"torchchat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
