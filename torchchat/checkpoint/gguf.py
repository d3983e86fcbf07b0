"""GGUF checkpoints: a bounds-checked header parser, `llama.*` config, ggml's dequantization.

The header is parsed here rather than with `gguf.GGUFReader`: every count, length, dimension and
offset is checked against the file size before anything is read or allocated (the file is
hostile until proven otherwise), and the parse is fast on 128k-token vocabularies, which
GGUFReader walks one numpy view per element. The `gguf` package supplies the type tables and the
reference dequantization (`gguf.quants.dequantize`, bit-identical to ggml's).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs, RopeScaling

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_BYTES = 65535  # the GGUF spec's limit on key length
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME (64) minus the terminating NUL
MAX_DIM = 2**63 - 1  # ggml stores dims as int64

SUPPORTED_ARCHS = ("llama",)
_Q = GGMLQuantizationType
SUPPORTED_TYPES = (
    *(_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1),
    *(_Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K),
)

_V = GGUFValueType
# value type -> (struct format, numpy dtype) for fixed-size values, all little-endian.
_FIXED: dict[int, tuple[str, str]] = {
    _V.UINT8: ("<B", "<u1"),
    _V.INT8: ("<b", "<i1"),
    _V.UINT16: ("<H", "<u2"),
    _V.INT16: ("<h", "<i2"),
    _V.UINT32: ("<I", "<u4"),
    _V.INT32: ("<i", "<i4"),
    _V.FLOAT32: ("<f", "<f4"),
    _V.BOOL: ("<B", "<u1"),
    _V.UINT64: ("<Q", "<u8"),
    _V.INT64: ("<q", "<i8"),
    _V.FLOAT64: ("<d", "<f8"),
}
# The fewest bytes one record can take: lengths, one byte of name, types, one value/dim, offset.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8

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
class TensorInfo:
    """One tensor-info record: name, ggml type, dims in ggml order (ne0 first), byte range."""

    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]
    offset: int  # absolute offset in the file
    n_elements: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch shape: ggml's ne0 (the contiguous row length) is the last dimension."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GGUFHeader:
    """A validated header: metadata values (arrays as lists) and tensor infos, in file order."""

    version: int
    metadata: dict[str, Any]
    value_types: dict[str, int]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF checkpoint carries besides weights: all metadata (tokenizer, chat template)."""

    path: Path
    metadata: dict[str, Any]
    tensor_types: dict[str, str] = field(default_factory=dict)  # native name -> ggml type name


def _show(text: str) -> str:
    """A name read from the file, safe to put in a one-line message."""
    return text if text.isprintable() and len(text) <= 80 else repr(text[:80])


class _Cursor:
    """Reads little-endian values from the file's bytes; never past the end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.path, self.size, self.pos = buf, path, len(buf), 0

    def fail(self, what: str, problem: str) -> NoReturn:
        raise TorchchatError(f"{self.path}: GGUF {what}: {problem}")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> int:
        """Claim n bytes at the cursor; their start offset."""
        if n > self.left:
            self.fail(
                what,
                f"{n} bytes at offset {self.pos} run past the end of the file ({self.size} bytes)",
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def fixed(self, vtype: int, what: str) -> Any:
        fmt = _FIXED[vtype][0]
        start = self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def u32(self, what: str) -> int:
        return self.fixed(_V.UINT32, what)

    def u64(self, what: str) -> int:
        return self.fixed(_V.UINT64, what)

    def string(self, what: str, max_bytes: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if max_bytes is not None and n > max_bytes:
            self.fail(what, f"length {n} exceeds the limit of {max_bytes} bytes")
        start = self.skip(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(what, "not valid UTF-8")


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    """One metadata value of type vtype; arrays become lists (no arrays of arrays)."""
    what = _show(key)
    if vtype == _V.STRING:
        return cur.string(what)
    if vtype in _FIXED:
        value = cur.fixed(vtype, what)
        if vtype == _V.FLOAT32:
            # Shortest decimal that round-trips in float32: a stored 1e-5 reads back as 1e-05.
            return float(str(np.float32(value)))
        return bool(value) if vtype == _V.BOOL else value
    if vtype != _V.ARRAY:
        cur.fail(what, f"unknown value type {vtype}")
    etype = cur.u32(f"{what} element type")
    count = cur.u64(f"{what} element count")
    if etype == _V.STRING:
        if count * 8 > cur.left:
            cur.fail(what, f"{count} strings do not fit in the {cur.left} bytes left")
        return [cur.string(f"{what}[{i}]") for i in range(count)]
    if etype not in _FIXED:
        kind = "arrays of arrays are" if etype == _V.ARRAY else f"element type {etype} is"
        cur.fail(what, f"{kind} not supported")
    fmt, dtype = _FIXED[etype]
    nbytes = count * struct.calcsize(fmt)
    if nbytes > cur.left:
        cur.fail(what, f"{count} elements do not fit in the {cur.left} bytes left")
    start = cur.skip(nbytes, what)
    values = np.frombuffer(cur.buf[start : start + nbytes], dtype=dtype).tolist()
    return [bool(v) for v in values] if etype == _V.BOOL else values


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    """(name, dims, raw ggml type, relative offset) of one tensor-info record."""
    name = cur.string(f"tensor #{index} name", MAX_TENSOR_NAME_BYTES)
    what = f"tensor {_show(name)}"
    n_dims = cur.u32(f"{what} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        cur.fail(f"{what} n_dims", f"{n_dims} is outside 1..{MAX_DIMS}")
    dims = tuple(cur.u64(f"{what} dims") for _ in range(n_dims))
    for d in dims:
        if not 0 < d <= MAX_DIM:
            cur.fail(f"{what} dims", f"dimension {d} in {list(dims)} is not in 1..2^63-1")
    raw_type = cur.u32(f"{what} type")
    offset = cur.u64(f"{what} offset")
    return name, dims, raw_type, offset


def _tensor_info(
    cur: _Cursor, record: tuple[str, tuple[int, ...], int, int], data_start: int, alignment: int
) -> TensorInfo:
    """Check one tensor's type, size and placement against the file."""
    name, dims, raw_type, offset = record
    what = f"tensor {_show(name)}"
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        cur.fail(f"{what} type", f"unknown ggml type {raw_type}")
    if dims[0] % block:
        cur.fail(
            f"{what} dims",
            f"row length {dims[0]} is not a multiple of the {ggml_type.name} block size {block}",
        )
    n_elements = math.prod(dims)  # Python ints: no overflow
    nbytes = n_elements // block * type_size
    if offset % alignment:
        cur.fail(f"{what} offset", f"{offset} is not a multiple of the alignment {alignment}")
    if data_start + offset + nbytes > cur.size:
        cur.fail(
            f"{what} offset",
            f"{nbytes} bytes at data offset {offset} end past the end of the file "
            f"({data_start} + {offset} + {nbytes} > {cur.size})",
        )
    return TensorInfo(name, ggml_type, dims, data_start + offset, n_elements, nbytes)


def _parse(cur: _Cursor) -> GGUFHeader:
    if cur.size < 4 or cur.buf[:4] != MAGIC:
        cur.fail("magic", "the file does not start with 'GGUF'")
    cur.skip(4, "magic")
    version = cur.u32("version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version >= 1 << 16 else ""
        cur.fail("version", f"{version} is not supported (2 or 3){hint}")
    n_tensors = cur.u64("tensor_count")
    n_kv = cur.u64("kv_count")
    if n_kv * _MIN_KV_BYTES > cur.left:
        cur.fail("kv_count", f"{n_kv} key/value pairs cannot fit in a {cur.size}-byte file")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        cur.fail("tensor_count", f"{n_tensors} tensors cannot fit in a {cur.size}-byte file")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}", MAX_KEY_BYTES)
        if not key:
            cur.fail(f"key #{i}", "empty key")
        if key in metadata:
            cur.fail(_show(key), "duplicate key")
        vtype = cur.u32(f"{_show(key)} value type")
        metadata[key] = _read_value(cur, vtype, key)
        value_types[key] = vtype

    records = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    names = set()
    for name, *_ in records:
        if name in names:
            cur.fail(f"tensor {_show(name)}", "duplicate tensor name")
        names.add(name)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] != _V.UINT32:
            cur.fail("general.alignment", "must be a uint32")
        if alignment == 0 or alignment & (alignment - 1):
            cur.fail("general.alignment", f"{alignment} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [_tensor_info(cur, r, data_start, alignment) for r in records]
    return GGUFHeader(version, metadata, value_types, tensors, alignment, data_start)


def validate_gguf(path: str | Path) -> GGUFHeader:
    """Parse and bounds-check a GGUF header; any violation is a one-line TorchchatError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise TorchchatError(f"{path}: GGUF header: file too short ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path))
    except OSError as e:
        raise TorchchatError(f"cannot read {path}: {e.strerror or e}") from None


def load_gguf(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor], GGUFInfo]:
    """`llama.*` config and weights in native names (quantized types dequantized to fp32)."""
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
            for name, info in native.items():
                data = _read_bytes(f, info)
                if name == "output.weight" and _same_data(f, data, info, native):
                    # Some converters (llama2.c's) write the shared embedding twice: keep one copy.
                    args.tie_embeddings = True
                    continue
                sd[name] = _to_tensor(data, info)
    except OSError as e:
        raise TorchchatError(f"cannot read {path}: {e.strerror or e}") from None
    if args.attention_bias:
        _zero_missing_biases(args, sd)
    if args.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    args.extra["source_format"] = "gguf"
    types = {name: info.ggml_type.name for name, info in native.items()}
    return args, sd, GGUFInfo(path, meta, types)


def _same_data(
    f: BinaryIO, data: np.ndarray, info: TensorInfo, native: dict[str, TensorInfo]
) -> bool:
    """True when `data` (output.weight) is a byte-for-byte copy of the token embedding."""
    emb = native.get("tok_embeddings.weight")
    if emb is None or (emb.ggml_type, emb.dims) != (info.ggml_type, info.dims):
        return False
    return np.array_equal(data, _read_bytes(f, emb))


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


# Linears that `--gguf-packed` keeps as low-bit codes: ggml type -> (bytes per block of 32).
PACKABLE = {_Q.Q4_0: 18, _Q.Q8_0: 34}
_LINEAR = re.compile(r"(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output)\.weight")


def read_packed_linears(path: str | Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Q4_0/Q8_0 linear weights as they are stored: native name -> (type, codes, fp16 scales).

    Q4_0: unsigned 4-bit codes (rows, cols), w = (code - 8) * scale.
    Q8_0: signed 8-bit codes (rows, cols), w = code * scale. Scales are (rows, cols // 32).
    """
    path = Path(path)
    header = validate_gguf(path)
    native, _ = _native_names(path, header.tensors)
    out = {}
    with open(path, "rb") as f:
        for name, info in native.items():
            if info.ggml_type not in PACKABLE or not _LINEAR.fullmatch(name):
                continue
            rows, cols = info.shape
            blocks = _read_bytes(f, info).reshape(rows, cols // 32, PACKABLE[info.ggml_type])
            scales = blocks[..., :2].copy().view(np.float16)[..., 0]
            qs = blocks[..., 2:]
            if info.ggml_type == _Q.Q4_0:  # low nibbles are elements 0-15, high nibbles 16-31
                codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
            else:
                codes = qs.view(np.int8).reshape(rows, cols)
            out[name] = (info.ggml_type.name, codes, scales)
    return out
