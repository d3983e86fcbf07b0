"""Options -> (model runtime, tokenizer): resolve config, load weights, pick dtype and device."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from torchchat import kernels
from torchchat.checkpoint import Checkpoint, load_checkpoint
from torchchat.errors import TorchchatError
from torchchat.generate.speculative import Speculator
from torchchat.kernels.ggml import TYPE_IDS
from torchchat.model.config import ModelArgs, known_model_args, known_model_names
from torchchat.model.transformer import Transformer
from torchchat.options import (
    DistributionOptions,
    ExecutionOptions,
    ModelOptions,
    QuantizeOptions,
    SourceOptions,
)
from torchchat.pages import advise_huge, huge_pages_status, release
from torchchat.quant.apply import apply_schemes, quantize, structural
from torchchat.quant.config import Scheme, load_quantize_spec
from torchchat.quant.gguf_blocks import type_name, use_gguf_blocks
from torchchat.runtime.base import ModelRuntime
from torchchat.runtime.eager import EagerRuntime
from torchchat.tokenizer import Tokenizer, load_tokenizer
from torchchat.tokenizer.gguf import gguf_tokenizer

if TYPE_CHECKING:
    from torchchat.distributed.sharding import Sharding

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SEQ_LEN = 4096  # KV cache size unless --max-seq-length asks for more


@dataclass
class BuiltModel:
    runtime: ModelRuntime
    tokenizer: Tokenizer
    args: ModelArgs
    speculator: Speculator | None = None  # draft model for speculative decoding, if asked for


def log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(msg, file=sys.stderr)


def resolve_device(device: str) -> str:
    """Map "fast" to the best present device; refuse devices that are absent."""
    if device == "fast":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TorchchatError("--device cuda requested but CUDA is not available (use --device cpu)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise TorchchatError("--device mps requested but MPS is not available (use --device cpu)")
    if device not in ("cpu", "cuda", "mps"):
        raise TorchchatError(f"unknown device {device!r} (choose cpu, cuda, mps or fast)")
    return device


def resolve_dtype(name: str | None, device: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """None keeps the checkpoint's float type; "fast" picks the device's best 16/32-bit type."""
    if name is None:
        return checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.float32
    if name == "fast":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device, torch.float32)
    if name not in DTYPES:
        raise TorchchatError(f"unknown dtype {name!r} (choose fp32, bf16, fp16 or fast)")
    return DTYPES[name]


def resolve_args(opts: SourceOptions, ckpt: Checkpoint, verbose: bool) -> ModelArgs:
    """--params-path > --params-table > config inside the checkpoint > name of the model folder."""
    if opts.params_path is not None:
        try:
            args = ModelArgs.from_dict(json.loads(Path(opts.params_path).read_text()))
        except FileNotFoundError:
            raise TorchchatError(f"params file not found: {opts.params_path}") from None
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise TorchchatError(f"invalid params file {opts.params_path}: {e}") from None
        source = f"--params-path {opts.params_path}"
    elif opts.params_table is not None:
        args, source = _known(opts.params_table), f"--params-table {opts.params_table}"
    elif ckpt.args is not None:
        args, source = ckpt.args, f"{ckpt.format} checkpoint {ckpt.path}"
    else:
        names = [
            n
            for n in known_model_names()
            if n.lower() in {p.name.lower() for p in ckpt.path.parents} | {ckpt.path.stem.lower()}
        ]
        if not names:
            raise TorchchatError(
                f"{ckpt.path} carries no model config: pass --params-path FILE.json or "
                f"--params-table NAME (known: {', '.join(known_model_names())})"
            )
        args, source = _known(names[0]), f"known config {names[0]} (matched the file name)"
    log(f"model config from {source}", verbose)
    return args


def _known(name: str) -> ModelArgs:
    try:
        return known_model_args(name)
    except KeyError:
        raise TorchchatError(
            f"unknown model {name!r}; known: {', '.join(known_model_names())}"
        ) from None


def check_shapes(model: Transformer, sd: dict[str, torch.Tensor]) -> None:
    """Every tensor present, none extra, each shaped as the config says."""
    expected = model.state_dict()
    for name, t in expected.items():
        if name in sd and tuple(sd[name].shape) != tuple(t.shape):
            raise TorchchatError(
                f"checkpoint tensor {name} has shape {tuple(sd[name].shape)} but the config expects "
                f"{tuple(t.shape)}: wrong --params-path/--params-table?"
            )
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise TorchchatError(
            f"checkpoint lacks tensor {missing[0]} (and {len(missing) - 1} more) that the config needs"
        )
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise TorchchatError(
            f"checkpoint has tensor {extra[0]} that the config does not expect ({len(extra)} unexpected)"
        )


def build_transformer(
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str,
    saved_schemes: list[Scheme] = (),
    sharding: Sharding | None = None,
    gguf_types: dict[str, int] | None = None,
) -> Transformer:
    """Instantiate on the meta device and adopt the checkpoint's tensors (no copy when possible).

    saved_schemes: the quantization the checkpoint was saved with (its modules are swapped in
    before loading, so the quantized tensors load as they are).
    sharding (--tp): build only this rank's share; `sd` holds `sharding.state_dict` slices.
    gguf_types: weights that stay in a GGUF's blocks (name -> ggml type id)."""
    with torch.device("meta"):
        model = Transformer(args)
        if sharding is not None:
            sharding.shrink(model)
        apply_schemes(model, list(saved_schemes), empty=True)
        if gguf_types:
            use_gguf_blocks(model, gguf_types)
    _cast_in_place(sd, dtype)
    sd = dict(sd)
    tied = args.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    if tied and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_shapes(model, sd)
    model.load_state_dict(sd, assign=True, strict=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype)


def _cast_in_place(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Float tensors of sd to dtype one at a time, each replacing its source in the dict: the
    checkpoint's copy is released before the next is cast, so memory holds the model once in
    dtype rather than also whole in the checkpoint's (7.2 -> ~2.6 GB peak for a 1.1B fp32 folder
    run in bf16). Shared tensors (tied embeddings) stay shared."""
    done: dict[int, torch.Tensor] = {}  # by id: the sources all live when this starts
    for name, t in sd.items():
        if t.is_floating_point() and t.dtype != dtype:
            if id(t) not in done:
                done[id(t)] = t.to(dtype)
                release(t)
            sd[name] = done[id(t)]


def model_from_checkpoint(
    opts: ModelOptions, verbose: bool = False
) -> tuple[Transformer, Checkpoint, list[Scheme]]:
    """Load weights and config, quantize if asked, build the Transformer in the requested
    dtype/device. Returns the model, its checkpoint and the quantization it now carries."""
    src, quant = opts.source, opts.quantization
    schemes, dtype_name, device = recipe_settings(quant, opts.execution)
    # A GGUF's blocks run as they are, unless asked otherwise or something needs floats.
    blocks = not (quant.gguf_dequantize or structural(schemes) or opts.distribution.tp > 1)
    blocks = blocks and device == "cpu"
    ckpt = load_checkpoint(
        src.checkpoint_path or src.gguf_path or _model_path(src.model), gguf_blocks=blocks
    )
    advise_huge(ckpt.state_dict.values())  # before any weight is read
    args = resolve_args(src, ckpt, verbose)
    saved = [Scheme(s["name"], s["args"]) for s in ckpt.extra.get("quantization", [])]
    if saved and structural(schemes):
        raise TorchchatError(
            f"{ckpt.path} is already quantized ({', '.join(s.name for s in saved)}); drop --quantize"
        )
    if saved and device != "cpu":
        raise TorchchatError(
            f"{ckpt.path} holds CPU-packed quantized weights: quantize again for {device}"
        )
    if not ckpt.state_dict:
        raise TorchchatError(f"{ckpt.path} holds no weights (a vocabulary-only file?)")
    first = next(iter(ckpt.state_dict.values()))
    float_dtype = first.dtype if first.dtype in DTYPES.values() else torch.float32
    dtype = resolve_dtype(dtype_name, device, float_dtype)
    sharding = tensor_parallel_sharding(opts, args, device, schemes, saved)
    sd = ckpt.state_dict if sharding is None else sharding.state_dict(ckpt.state_dict)
    if ckpt.format == "gguf" and blocks:
        types = gguf_block_types(ckpt)
        log(f"GGUF: {len(types)} tensors run in the file's blocks ({_type_counts(types)})", verbose)
        return build_transformer(args, sd, dtype, device, gguf_types=types), ckpt, []
    if not structural(schemes):
        return build_transformer(args, sd, dtype, device, saved, sharding), ckpt, saved
    calibration = None
    if any(s.name == "linear:gptq" for s in schemes):
        from torchchat.quant.gptq import calibration_batches, calibration_text

        gptq = next(s for s in schemes if s.name == "linear:gptq").args
        text = calibration_text(
            gptq["calibration_file"] or quant.calibration_file,
            gptq["calibration_tasks"] or quant.calibration_tasks,
            quant.calibration_tasks_path,
            gptq["calibration_limit"] or quant.calibration_limit,
        )
        calibration = calibration_batches(
            find_tokenizer(src, ckpt),
            text,
            gptq["calibration_seq_length"],
            gptq["calibration_samples"],
        )
    model = quantized_model(args, sd, schemes, dtype, device, float_dtype, sharding, calibration)
    return model, ckpt, structural(schemes)


def recipe_settings(
    quant: QuantizeOptions, execution: ExecutionOptions
) -> tuple[list[Scheme], str | None, str]:
    """The --quantize recipe's schemes, and the dtype name and device to run in: the recipe's
    `precision` and `executor` override --dtype and --device."""
    schemes = load_quantize_spec(quant.recipe) if quant.recipe else []
    dtype_name, device_name = execution.dtype, execution.device
    for scheme in schemes:
        if scheme.name == "precision":
            dtype_name = scheme.args["dtype"]
        elif scheme.name == "executor":
            device_name = scheme.args["accelerator"]
    return schemes, dtype_name, resolve_device(device_name)


def quantized_model(
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    schemes: list[Scheme],
    dtype: torch.dtype,
    device: str,
    float_dtype: torch.dtype = torch.float32,
    sharding: Sharding | None = None,
    calibration: list[torch.Tensor] | None = None,
) -> Transformer:
    """The Transformer of `sd` (float weights, this rank's share under --tp) quantized as the
    recipe's schemes ask: quantized from the weights' own precision, then cast to `dtype`."""
    if not structural(schemes):  # nothing to quantize: cast while building, no float copy
        return build_transformer(args, sd, dtype, device, sharding=sharding)
    model = build_transformer(args, sd, float_dtype, device, sharding=sharding)
    # The model holds the weights now: without the dict's references each float weight is
    # freed (or its file pages released) as soon as it is quantized, so memory never holds
    # the float model and its quantized copy at once.
    sd.clear()
    quantize(model, schemes, calibration)
    return cast_floats(model, dtype)


def cast_floats(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), releasing each source's file pages as it is cast."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype == dtype:
            return t
        out = t.to(dtype)
        release(t)
        return out

    return model._apply(cast)


def make_runtime(
    model: Transformer,
    max_seq: int,
    execution: ExecutionOptions,
    distribution: DistributionOptions | None = None,
) -> ModelRuntime:
    """The runtime for a built model: one process (eager, compiled or fused decode, on
    torchchat's kernels where they run), or rank 0 of --tp N."""
    if distribution is not None and distribution.tp > 1:
        return tensor_parallel_runtime(model, max_seq, execution, distribution)
    return EagerRuntime(
        model,
        max_seq,
        compile=execution.compile,
        compile_prefill=execution.compile_prefill,
        fused_decode=execution.fused_decode,
    )


# --- tensor parallelism (--tp N under torchrun): torchchat/distributed ---------------------


def tensor_parallel_sharding(
    opts: ModelOptions, args: ModelArgs, device: str, schemes: list[Scheme], saved: list[Scheme]
) -> Sharding | None:
    """This rank's share of the model under --tp N (joining the process group), else None."""
    tp = opts.distribution.tp
    if tp == 1:
        return None
    from torchchat.distributed.group import init_from_env
    from torchchat.distributed.sharding import Sharding, quantizes_linears

    if saved:
        raise TorchchatError(
            "--tp splits float weights: load a float checkpoint (--quantize then runs per rank)"
        )
    if any(s.name == "linear:gptq" for s in schemes):
        raise TorchchatError("--tp cannot calibrate GPTQ: use linear:int8 or linear:int4")
    if opts.speculation.enabled:
        raise TorchchatError("--tp does not run speculative decoding: drop --draft-*")
    group = init_from_env(tp, device)
    # Quantized linears need wo/w2 split by output rows to match one process exactly.
    sharding = Sharding(group.rank, group.world, gather=quantizes_linears(schemes))
    sharding.check(args)
    return sharding


def tensor_parallel_runtime(
    model: Transformer, max_seq: int, execution: ExecutionOptions, distribution: DistributionOptions
) -> ModelRuntime:
    """Rank 0's runtime of a model sharded by --tp (the other ranks follow it)."""
    from torchchat.distributed.group import init_from_env
    from torchchat.distributed.runtime import TensorParallelRuntime

    group = init_from_env(distribution.tp, str(model.norm.weight.device))
    return TensorParallelRuntime(
        model,
        max_seq,
        group,
        compile=execution.compile,
        compile_prefill=execution.compile_prefill,
    )


# ---------------------------------------------------------------------------------------------


def _model_path(model: str | None) -> Path:
    """The positional MODEL, a path (the CLI has looked model names up in the model directory)."""
    if model is None:
        raise TorchchatError(
            "no model given: pass a checkpoint path, a model name, --checkpoint-path or --gguf-path"
        )
    path = Path(model).expanduser()
    if not path.exists():
        raise TorchchatError(f"model not found: {model} (no such file or folder)")
    return path


def gguf_block_types(ckpt: Checkpoint) -> dict[str, int]:
    """The weights of a GGUF loaded in blocks (uint8 views) -> their ggml type ids."""
    names = ckpt.extra["gguf"].tensor_types
    types = {}
    for name, t in ckpt.state_dict.items():
        if t.dtype == torch.uint8:
            own = names.get(name) or names["tok_embeddings.weight"]  # a tied output: the table's
            types[name] = TYPE_IDS[own]
    return types


def _type_counts(types: dict[str, int]) -> str:
    counts = Counter(type_name(t) for t in types.values())
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def find_tokenizer(opts: SourceOptions, ckpt: Checkpoint) -> Tokenizer:
    """--tokenizer-path, else a GGUF's own vocabulary, else a tokenizer file beside the checkpoint."""
    if opts.tokenizer_path is not None:
        return load_tokenizer(opts.tokenizer_path)
    if ckpt.format == "gguf":
        return gguf_tokenizer(ckpt.extra["gguf"].metadata, str(ckpt.path))
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    try:
        return load_tokenizer(folder)
    except TorchchatError:
        raise TorchchatError(
            f"no tokenizer found next to {ckpt.path}: pass --tokenizer-path"
        ) from None


def build_exported(opts: ModelOptions) -> BuiltModel:
    """An exported artifact (.pt2 / .pte) and its tokenizer (--tokenizer-path or beside it)."""
    from torchchat.runtime.exported import AOTIRuntime, ExecuTorchRuntime

    src, execution = opts.source, opts.execution
    if execution.compile or opts.quantization.recipe or opts.speculation.enabled:
        raise TorchchatError(
            "exported models are already compiled and quantized: drop --compile/--quantize/--draft-*"
        )
    path = Path(src.exported)
    runtime = AOTIRuntime(path) if src.aoti_package_path else ExecuTorchRuntime(path)
    try:
        tokenizer = load_tokenizer(src.tokenizer_path or path.parent)
    except TorchchatError:
        raise TorchchatError(f"no tokenizer next to {path}: pass --tokenizer-path") from None
    if runtime.tokenizer_kind and tokenizer.kind != runtime.tokenizer_kind:
        raise TorchchatError(
            f"{path} was exported with a {runtime.tokenizer_kind} tokenizer, not {tokenizer.kind}"
        )
    if execution.max_seq_length and execution.max_seq_length != runtime.max_seq_len:
        raise TorchchatError(
            f"{path} was exported for --max-seq-length {runtime.max_seq_len}; export again to change it"
        )
    return BuiltModel(runtime, tokenizer, runtime.args)


def build_model(opts: ModelOptions, verbose: bool = False) -> BuiltModel:
    """Everything a verb needs to run the model."""
    if opts.source.exported:
        return build_exported(opts)
    model, ckpt, _ = model_from_checkpoint(opts, verbose)
    tokenizer = find_tokenizer(opts.source, ckpt)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise TorchchatError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}: "
            "wrong --tokenizer-path?"
        )
    max_seq = opts.execution.max_seq_length or min(model.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    if max_seq > model.args.max_seq_len or max_seq < 2:
        raise TorchchatError(
            f"--max-seq-length {max_seq} is outside 2..{model.args.max_seq_len} (the model's context)"
        )
    runtime = make_runtime(model, max_seq, opts.execution, opts.distribution)
    if model.norm.weight.device.type == "cpu":
        log(kernels.status(), verbose)  # the instruction-set level, or why torch's ops run
        log(huge_pages_status(model), verbose)
    return BuiltModel(runtime, tokenizer, model.args, build_speculator(opts, runtime, verbose))


def build_speculator(opts: ModelOptions, target: ModelRuntime, verbose: bool) -> Speculator | None:
    """A draft model: another checkpoint (--draft-checkpoint-path) or a quantized copy of the
    target (--draft-quantize), sharing the target's tokenizer and KV cache length."""
    spec = opts.speculation
    if not spec.enabled:
        return None
    if spec.speculate_k < 1:
        raise TorchchatError("--speculate-k must be at least 1")
    src = opts.source
    if spec.draft_checkpoint_path is not None:  # another checkpoint: only the tokenizer is shared
        src = SourceOptions(
            checkpoint_path=spec.draft_checkpoint_path, tokenizer_path=src.tokenizer_path
        )
    execution = replace(opts.execution, compile_prefill=False)
    quant = replace(opts.quantization, recipe=spec.draft_quantize)
    draft_opts = ModelOptions(src, quant, execution)
    draft, _, _ = model_from_checkpoint(draft_opts, verbose)
    if draft.args.vocab_size != target.args.vocab_size:
        raise TorchchatError(
            f"draft model vocabulary ({draft.args.vocab_size}) differs from the target's "
            f"({target.args.vocab_size}): speculative decoding needs the same tokenizer"
        )
    if draft.args.max_seq_len < target.max_seq_len:
        raise TorchchatError(
            f"draft model context {draft.args.max_seq_len} is shorter than {target.max_seq_len}"
        )
    log(
        f"speculative decoding with a draft of {draft.args.weight_count() / 1e6:.1f}M parameters, k={spec.speculate_k}",
        verbose,
    )
    draft_runtime = make_runtime(draft, target.max_seq_len, execution)
    return Speculator(target, draft_runtime, spec.speculate_k)
