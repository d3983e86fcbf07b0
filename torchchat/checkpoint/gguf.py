"""GGUF checkpoints: `llama.*` config, tensor names, ggml's dequantization, on the header that
gguf_header.py parses and checks. The `gguf` package supplies the type tables and the reference
dequantization (`gguf.quants.dequantize`, bit-identical to ggml's).
"""

from __future__ import annotations

import math
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from torchchat.checkpoint.gguf_header import (
    SUPPORTED_ARCHS,
    SUPPORTED_TYPES,
    TensorInfo,
    _show,
    validate_gguf,
)
from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs, RopeScaling
from torchchat.pages import release

_Q = GGMLQuantizationType

# GGUF (llama.cpp) tensor name -> torchchat native name; {} is the layer index.
_LAYER_TENSORS = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "attn_norm": "attention_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "ffn_norm": "ffn_norm",
}
_TOP_TENSORS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d{1,6})\.(\w+)\.(weight|bias)")
_BIASED = ("attn_q", "attn_k", "attn_v", "attn_output")
ROPE_FREQS = "rope_freqs.weight"
# llama.cpp writes token ids as uint32; 0xFFFFFFFF (and -1) mean "no such token".
_NULL_TOKEN_IDS = (-1, 2**32 - 1)
_TOKEN_ID_KEY = re.compile(r"tokenizer\.ggml\.\w+_token_id")


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF checkpoint carries besides weights: all metadata (tokenizer, chat template)."""

    path: Path
    metadata: dict[str, Any]
    tensor_types: dict[str, str] = field(default_factory=dict)  # native name -> ggml type name


def load_gguf(
    path: str | Path, blocks: bool = False
) -> tuple[ModelArgs, dict[str, torch.Tensor], GGUFInfo]:
    """`llama.*` config and weights in native names. Quantized types are dequantized to fp32 as
    ggml does; with `blocks`, the linears and the token table stay in the file's blocks instead:
    uint8 (rows, bytes a row) views of the memory-mapped file, their ggml types in
    GGUFInfo.tensor_types (see `BLOCK_TYPES`)."""
    path = Path(path)
    header = validate_gguf(path)
    meta = header.metadata
    arch = _architecture(path, meta)
    native, rope_freqs = _native_names(path, header.tensors)
    args = _model_args(path, meta, arch, native)
    _check_token_ids(path, meta, args.vocab_size)
    sd: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            if rope_freqs is not None:
                factors = _read_bytes(f, rope_freqs).view(np.float32)
                args.rope_scaling = _rope_scaling_from_freqs(path, rope_freqs, factors, args)
            mapped = _map(f)
            for name, info in native.items():
                if name == "output.weight" and _same_data(mapped, info, native):
                    # Some converters (llama2.c's) write the shared embedding twice: keep one copy.
                    args.tie_embeddings = True
                    continue
                if blocks and _in_blocks(name, info):
                    sd[name] = mapped[info.offset : info.offset + info.nbytes].view(
                        info.shape[0], -1
                    )
                elif (view := _float_view(mapped, info)) is not None:
                    sd[name] = view  # mapped, not read: a cast or quantize releases its pages
                else:
                    sd[name] = _to_tensor(_read_bytes(f, info), info)
    except OSError as e:
        raise TorchchatError(f"cannot read {path}: {e.strerror or e}") from None
    if args.attention_bias:
        _zero_missing_biases(args, sd)
    if args.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    args.extra["source_format"] = "gguf"
    types = {name: info.ggml_type.name for name, info in native.items()}
    return args, sd, GGUFInfo(path, meta, types)


# The ggml types that stay in blocks (torchchat's kernels run them), for the linears and the
# token table; other tensors (norms, float weights) load as floats.
BLOCK_TYPES = (_Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0, _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K)
BLOCK_TYPES += (_Q.Q6_K,)
_BLOCK_TENSOR = re.compile(
    r"(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output|tok_embeddings)\.weight"
)


def _in_blocks(name: str, info: TensorInfo) -> bool:
    return (
        info.ggml_type in BLOCK_TYPES
        and len(info.dims) == 2
        and bool(_BLOCK_TENSOR.fullmatch(name))
    )


def _map(f: BinaryIO) -> torch.Tensor:
    """The whole file as a uint8 tensor over a private mapping: pages are read when touched and
    shared with the page cache, nothing is copied, and nothing written reaches the file."""
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=torch.uint8)


def _same_data(mapped: torch.Tensor, info: TensorInfo, native: dict[str, TensorInfo]) -> bool:
    """True when the tensor of `info` (output.weight) is a byte-for-byte copy of the token
    embedding, of any type (blocks or floats: either way one table is kept); the pages compared
    are dropped from the resident set again."""
    emb = native.get("tok_embeddings.weight")
    if emb is None or (emb.ggml_type, emb.dims) != (info.ggml_type, info.dims):
        return False
    if info.offset == emb.offset:  # one tensor's bytes named twice
        return True
    a = mapped[info.offset : info.offset + info.nbytes]
    b = mapped[emb.offset : emb.offset + emb.nbytes]
    same = torch.equal(a, b)
    release(a, b)
    return same


# Float tensors that load as views of the mapped file (GGUF aligns tensor data to 32 bytes by
# default; a file that does not align one gets it read into memory instead).
_FLOAT_VIEWS = {_Q.F32: torch.float32, _Q.F16: torch.float16, _Q.BF16: torch.bfloat16}


def _float_view(mapped: torch.Tensor, info: TensorInfo) -> torch.Tensor | None:
    """An F32/F16/BF16 tensor as a view of the mapping (the file's values, nothing read until
    used); None for other types or a misaligned offset."""
    dtype = _FLOAT_VIEWS.get(info.ggml_type)
    if dtype is None or info.offset % dtype.itemsize:
        return None
    return mapped[info.offset : info.offset + info.nbytes].view(dtype).view(info.shape)


def _zero_missing_biases(args: ModelArgs, sd: dict[str, torch.Tensor]) -> None:
    """llama.cpp's llama graph takes each attention bias as optional; ours needs all four."""
    for i in range(args.n_layers):
        for proj in ("wq", "wk", "wv", "wo"):
            name = f"layers.{i}.attention.{proj}.bias"
            weight = sd.get(f"layers.{i}.attention.{proj}.weight")
            if name not in sd and weight is not None:
                sd[name] = torch.zeros(weight.shape[0], dtype=torch.float32)


def _fail(path: Path, what: str, problem: str) -> NoReturn:
    raise TorchchatError(f"{path}: GGUF {what}: {problem}")


def _architecture(path: Path, meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        _fail(path, "general.architecture", "missing or not a string")
    if arch not in SUPPORTED_ARCHS:
        _fail(
            path,
            "general.architecture",
            f"{arch[:80]!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})",
        )
    return arch


def _native_names(
    path: Path, tensors: list[TensorInfo]
) -> tuple[dict[str, TensorInfo], TensorInfo | None]:
    """Native name -> tensor, plus rope_freqs; unknown names and unsupported types are errors."""
    native: dict[str, TensorInfo] = {}
    rope_freqs = None
    for info in tensors:
        if info.name == ROPE_FREQS:
            if info.ggml_type != _Q.F32 or len(info.dims) != 1:
                _fail(path, f"tensor {ROPE_FREQS}", "expected a 1-D F32 tensor")
            rope_freqs = info
            continue
        name = _TOP_TENSORS.get(info.name)
        m = _LAYER_NAME.fullmatch(info.name)
        if m and m.group(2) in _LAYER_TENSORS and (m.group(3) == "weight" or m.group(2) in _BIASED):
            name = f"layers.{int(m.group(1))}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
        if name is None:
            _fail(path, f"tensor {_show(info.name)}", "not a tensor of the llama architecture")
        if name in native:
            _fail(path, f"tensor {_show(info.name)}", f"duplicates {native[name].name}")
        if info.ggml_type not in SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in SUPPORTED_TYPES)
            _fail(
                path,
                f"tensor {_show(info.name)} type",
                f"{info.ggml_type.name} is not supported (supported: {supported})",
            )
        native[name] = info
    return native, rope_freqs


def _meta_int(path: Path, meta: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer metadata value (required unless a default is given)."""
    value = meta.get(key, default)
    if value is None:
        _fail(path, key, "missing")
    if isinstance(value, list):
        _fail(path, key, "per-layer values are not supported")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(path, key, f"expected a positive integer, got {_show(repr(value))}")
    return value


def _meta_float(path: Path, meta: dict[str, Any], key: str, default: float | None = None) -> float:
    """A positive finite float metadata value (required unless a default is given)."""
    value = meta.get(key, default)
    if value is None:
        _fail(path, key, "missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(path, key, f"expected a number, got {_show(repr(value))}")
    if not (math.isfinite(value) and value > 0):
        _fail(path, key, f"expected a positive finite number, got {value}")
    return float(value)


def _model_args(
    path: Path, meta: dict[str, Any], arch: str, native: dict[str, TensorInfo]
) -> ModelArgs:
    """ModelArgs from `<arch>.*` metadata, checked against the tensors the file holds."""
    dim = _meta_int(path, meta, f"{arch}.embedding_length")
    n_heads = _meta_int(path, meta, f"{arch}.attention.head_count")
    n_kv_heads = _meta_int(path, meta, f"{arch}.attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        _fail(
            path,
            f"{arch}.attention.head_count_kv",
            f"{n_heads} heads are not a multiple of {n_kv_heads}",
        )
    if f"{arch}.attention.key_length" not in meta and dim % n_heads:
        _fail(path, f"{arch}.embedding_length", f"{dim} is not a multiple of {n_heads} heads")
    head_dim = _meta_int(path, meta, f"{arch}.attention.key_length", dim // n_heads)
    value_dim = _meta_int(path, meta, f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        _fail(
            path,
            f"{arch}.attention.value_length",
            f"{value_dim} differs from key_length {head_dim}",
        )
    rope_dims = _meta_int(path, meta, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        _fail(
            path,
            f"{arch}.rope.dimension_count",
            f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported",
        )
    if meta.get(f"{arch}.expert_count", 0):
        _fail(path, f"{arch}.expert_count", "mixture-of-experts models are not supported")
    _check_rope_scaling_metadata(path, meta, arch)

    n_layers = _meta_int(path, meta, f"{arch}.block_count")
    if native:
        found = {int(name.split(".")[1]) for name in native if name.startswith("layers.")}
        if found != set(range(n_layers)):
            _fail(
                path,
                f"{arch}.block_count",
                f"{n_layers} layers, but the file has tensors for {len(found)} layer(s) "
                f"numbered {min(found, default=0)}..{max(found, default=-1)}",
            )
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else None
    vocab_size = meta.get(f"{arch}.vocab_size")
    if vocab_size is not None:
        vocab_size = _meta_int(path, meta, f"{arch}.vocab_size")
        if n_tokens is not None and n_tokens != vocab_size:
            _fail(
                path,
                f"{arch}.vocab_size",
                f"{vocab_size} but tokenizer.ggml.tokens has {n_tokens} tokens",
            )
    elif n_tokens:
        vocab_size = n_tokens
    elif "tok_embeddings.weight" in native:
        vocab_size = native["tok_embeddings.weight"].shape[0]
    else:
        _fail(path, f"{arch}.vocab_size", "missing, and the file has no tokenizer.ggml.tokens")

    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        hidden_dim=_meta_int(path, meta, f"{arch}.feed_forward_length"),
        head_dim=head_dim,
        norm_eps=_meta_float(path, meta, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=_meta_float(path, meta, f"{arch}.rope.freq_base", 10000.0),
        max_seq_len=_meta_int(path, meta, f"{arch}.context_length"),
        attention_bias=any(name.endswith(".bias") for name in native),
        tie_embeddings=bool(native) and "output.weight" not in native,
    )


def _check_rope_scaling_metadata(path: Path, meta: dict[str, Any], arch: str) -> None:
    """Only unscaled RoPE (or Llama 3 scaling, stored as rope_freqs.weight) is supported."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is not None and not isinstance(kind, str):
        _fail(path, f"{arch}.rope.scaling.type", "not a string")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int | float)):
        _fail(path, f"{arch}.rope.scaling.factor", "not a number")
    # llama.cpp reads a factor without a type as linear scaling; a factor of 0 or 1 is no scaling.
    scaled = factor not in (None, 0, 1)
    if kind == "none" or (kind in (None, "linear") and not scaled):
        return
    _fail(
        path,
        f"{arch}.rope.scaling.type",
        f"{(kind or 'linear')[:80]!r} RoPE scaling (factor {factor}) is not supported",
    )


def _check_token_ids(path: Path, meta: dict[str, Any], vocab_size: int) -> None:
    """Every tokenizer.ggml.*_token_id names a token that exists (or is llama.cpp's 'none')."""
    tokens = meta.get("tokenizer.ggml.tokens")
    n = len(tokens) if isinstance(tokens, list) else vocab_size
    for key, value in meta.items():
        if not _TOKEN_ID_KEY.fullmatch(key):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, key, f"expected a token id, got {_show(repr(value))}")
        if value not in _NULL_TOKEN_IDS and not 0 <= value < n:
            _fail(path, key, f"token id {value} is not below the vocabulary size {n}")


def _read_bytes(f: BinaryIO, info: TensorInfo) -> np.ndarray:
    """A tensor's raw bytes (offset and size were checked against the file by validate_gguf)."""
    data = np.empty(info.nbytes, dtype=np.uint8)
    f.seek(info.offset)
    if f.readinto(memoryview(data)) != info.nbytes:
        raise TorchchatError(f"{f.name}: GGUF tensor {_show(info.name)}: file shrank while reading")
    return data


def _to_tensor(data: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """F32/F16/BF16 as they are (exact), every quantized type dequantized to fp32 as ggml does."""
    if info.ggml_type == _Q.F32:
        return torch.from_numpy(data.view(np.float32).reshape(info.shape))
    if info.ggml_type == _Q.F16:
        return torch.from_numpy(data.view(np.float16).reshape(info.shape))
    if info.ggml_type == _Q.BF16:
        return torch.from_numpy(data.view(np.int16).reshape(info.shape)).view(torch.bfloat16)
    block, type_size = GGML_QUANT_SIZES[info.ggml_type]
    rows = data.reshape(-1, info.dims[0] // block * type_size)
    with np.errstate(all="ignore"):  # hostile scales may overflow to inf: that is the file's value
        values = dequantize(rows, info.ggml_type)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(info.shape))


def llama3_rope_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's convert_hf_to_gguf.py writes as rope_freqs.weight."""
    # Same float32 arithmetic as the converter, so a file it wrote is reproduced bit for bit.
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old_context = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = 1 / ((1 - smooth) / scaling.factor + smooth)
    high_wavelen = old_context / scaling.high_freq_factor
    low_wavelen = old_context / scaling.low_freq_factor
    factors = torch.where(wavelen > low_wavelen, torch.tensor(scaling.factor), blended)
    factors = torch.where(wavelen < high_wavelen, torch.tensor(1.0), factors)
    return factors.numpy().astype(np.float32)


def _rope_scaling_from_freqs(
    path: Path, info: TensorInfo, factors: np.ndarray, args: ModelArgs
) -> RopeScaling | None:
    """Llama 3.1 RoPE scaling recovered from rope_freqs.weight, verified by recomputing it."""
    what = f"tensor {ROPE_FREQS}"
    if info.dims != (args.head_dim // 2,):
        _fail(
            path,
            what,
            f"shape {list(info.dims)} but head_dim {args.head_dim} needs [{args.head_dim // 2}]",
        )
    if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        _fail(path, what, "factors must be positive and finite")
    if np.all(factors == 1):
        return None
    for low, high, factor in _llama3_candidates(factors, args.rope_theta, args.head_dim):
        if not (0 < low < high and factor > 0):
            continue
        scaling = RopeScaling(float(factor), float(low), float(high), _OLD_CONTEXT)
        expected = llama3_rope_factors(scaling, args.rope_theta, args.head_dim)
        if np.allclose(expected, factors, rtol=1e-6, atol=0):
            return scaling
    _fail(
        path,
        what,
        "per-frequency RoPE factors that are not Llama 3.1-style scaling are not supported",
    )


# Only the ratios of (context, low, high) matter, so the context is fixed at the converter's 8192.
_OLD_CONTEXT = 8192


def _llama3_candidates(
    factors: np.ndarray, theta: float, head_dim: int
) -> list[tuple[float, float, float]]:
    """(low_freq_factor, high_freq_factor, factor) guesses that might have produced `factors`."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    x = _OLD_CONTEXT * freqs / (2 * math.pi)  # the converter's old_context_len / wavelen
    guesses = []
    factor = float(factors.max())
    inner = (factors > 1) & (factors < factor)
    if inner.sum() >= 2:
        # In the blend, smooth is linear in x: its line gives low and high.
        smooth = (1 / factors[inner] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[inner], smooth, 1)
        if slope > 0:
            low, high = -intercept / slope, (1 - intercept) / slope
            guesses += [(round(low, 4), round(high, 4), factor), (low, high, factor)]
    # Every Llama 3.1/3.2/3.3 uses low 1, high 4. With no frequency fully scaled (small heads),
    # the factor follows from a blended one.
    low, high = 1.0, 4.0
    guesses.append((low, high, factor))
    blended = np.flatnonzero((x > low) & (x < high))
    if blended.size:
        i = blended[0]
        s = (x[i] - low) / (high - low)
        if 1 / factors[i] - s > 0:
            derived = (1 - s) / (1 / factors[i] - s)
            guesses += [(low, high, round(derived, 4)), (low, high, derived)]
    return guesses
