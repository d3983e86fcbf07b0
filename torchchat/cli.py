"""Command line: parse verbs into option objects, run them, turn TorchchatError into one line."""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

from torchchat.errors import TorchchatError
from torchchat.generate.sampling import SamplingOptions
from torchchat.options import ChatOptions, GenerateOptions, ModelOptions


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint path (file or folder) or known model name")
    p.add_argument("--checkpoint-path", type=Path)
    p.add_argument("--gguf-path", type=Path)
    p.add_argument("--params-path", type=Path, help="model config JSON (ModelArgs fields)")
    p.add_argument("--params-table", help="name of a known model config")
    p.add_argument("--tokenizer-path", type=Path)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fast"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "fast"])
    p.add_argument(
        "--max-seq-length", type=int, help="KV cache positions (default: min(context, 4096))"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--compile-prefill", action="store_true", help="torch.compile prefill too")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no metrics on stderr")


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
    return parser


def model_options(a: argparse.Namespace) -> ModelOptions:
    return ModelOptions(
        model=a.model,
        checkpoint_path=a.checkpoint_path,
        gguf_path=a.gguf_path,
        params_path=a.params_path,
        params_table=a.params_table,
        tokenizer_path=a.tokenizer_path,
        dtype=a.dtype,
        device=a.device,
        max_seq_length=a.max_seq_length,
        compile=a.compile,
        compile_prefill=a.compile_prefill,
    )


def sampling_options(a: argparse.Namespace) -> SamplingOptions:
    try:
        return SamplingOptions(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    except ValueError as e:
        raise TorchchatError(str(e)) from None


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def report(metrics, runtime, quiet: bool, cached: int = 0) -> None:
    """Metrics line on stderr."""
    if quiet:
        return
    gbps = runtime.weight_bytes * metrics.decode_tps / 1e9
    cache_note = f" (+{cached} reused from cache)" if cached else ""
    print(
        f"prompt {metrics.prompt_tokens} tokens{cache_note}, generated {metrics.new_tokens}; "
        f"time to first token {metrics.ttft_s:.3f} s; prefill {metrics.prefill_tps:.1f} tok/s; "
        f"decode {metrics.decode_tps:.1f} tok/s; {gbps:.2f} GB/s; "
        f"peak memory {peak_memory_mb(runtime.device):.0f} MB",
        file=sys.stderr,
    )


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
    gen = Generator(built.runtime, tok)
    for i in range(opts.num_samples):
        seed = None if opts.sampling.seed is None else opts.sampling.seed + i
        sampling = SamplingOptions(
            opts.sampling.temperature, opts.sampling.top_k, opts.sampling.top_p, seed
        )
        res = Result()
        for piece in gen.stream(
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
        report(res.metrics, built.runtime, a.quiet)


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
    session = ChatSession(built.runtime, built.tokenizer, template, opts)
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


VERBS = {"generate": run_generate, "chat": run_chat, "convert": run_convert}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `torchchat` console script."""
    args = build_parser().parse_args(argv)
    try:
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
