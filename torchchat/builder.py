"""Options -> (model runtime, tokenizer): resolve config, load weights, pick dtype and device."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from torchchat.checkpoint import Checkpoint, load_checkpoint
from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs, known_model_args, known_model_names
from torchchat.model.transformer import Transformer
from torchchat.options import ModelOptions
from torchchat.runtime.base import ModelRuntime
from torchchat.runtime.eager import EagerRuntime
from torchchat.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SEQ_LEN = 4096  # KV cache size unless --max-seq-length asks for more


@dataclass
class BuiltModel:
    runtime: ModelRuntime
    tokenizer: Tokenizer
    args: ModelArgs


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


def resolve_args(opts: ModelOptions, ckpt: Checkpoint, verbose: bool) -> ModelArgs:
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
    args: ModelArgs, sd: dict[str, torch.Tensor], dtype: torch.dtype, device: str
) -> Transformer:
    """Instantiate on the meta device and adopt the checkpoint's tensors (no copy when possible)."""
    with torch.device("meta"):
        model = Transformer(args)
    sd = dict(sd)
    if args.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_shapes(model, sd)
    model.load_state_dict(sd, assign=True, strict=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype)


def model_from_checkpoint(
    opts: ModelOptions, verbose: bool = False
) -> tuple[Transformer, Checkpoint]:
    """Load weights and config, build the Transformer in the requested dtype/device."""
    path = opts.checkpoint_path or opts.gguf_path or _model_path(opts.model)
    ckpt = load_checkpoint(path)
    args = resolve_args(opts, ckpt, verbose)
    device = resolve_device(opts.device)
    first = next(iter(ckpt.state_dict.values()))
    dtype = resolve_dtype(opts.dtype, device, first.dtype)
    return build_transformer(args, ckpt.state_dict, dtype, device), ckpt


def _model_path(model: str | None) -> Path:
    if model is None:
        raise TorchchatError(
            "no model given: pass a checkpoint path, --checkpoint-path or --gguf-path"
        )
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model in known_model_names():
        raise TorchchatError(f"model {model!r} is not available locally: pass --checkpoint-path")
    raise TorchchatError(f"unknown model {model!r}: not a path and not a known model name")


def find_tokenizer(opts: ModelOptions, ckpt: Checkpoint) -> Tokenizer:
    """--tokenizer-path, else a tokenizer file in the checkpoint's folder."""
    if opts.tokenizer_path is not None:
        return load_tokenizer(opts.tokenizer_path)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    try:
        return load_tokenizer(folder)
    except TorchchatError:
        raise TorchchatError(
            f"no tokenizer found next to {ckpt.path}: pass --tokenizer-path"
        ) from None


def build_model(opts: ModelOptions, verbose: bool = False) -> BuiltModel:
    """Everything a verb needs to run the model."""
    model, ckpt = model_from_checkpoint(opts, verbose)
    tokenizer = find_tokenizer(opts, ckpt)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise TorchchatError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}: "
            "wrong --tokenizer-path?"
        )
    max_seq = opts.max_seq_length or min(model.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    if max_seq > model.args.max_seq_len or max_seq < 2:
        raise TorchchatError(
            f"--max-seq-length {max_seq} is outside 2..{model.args.max_seq_len} (the model's context)"
        )
    runtime = EagerRuntime(
        model, max_seq, compile=opts.compile, compile_prefill=opts.compile_prefill
    )
    return BuiltModel(runtime, tokenizer, model.args)
