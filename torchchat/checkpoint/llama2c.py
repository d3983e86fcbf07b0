"""llama2.c checkpoints: the `.bin` export (legacy v0 and versioned v1/v2) and training `.pt` files."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchchat.errors import TorchchatError
from torchchat.model.config import ModelArgs

MAGIC = 0x616B3432  # "ak42": versioned llama2.c export
V1_HEADER_BYTES = 256


def is_llama2c_pt(obj: Any) -> bool:
    return isinstance(obj, dict) and "model_args" in obj and "model" in obj


def from_llama2c_pt(obj: dict) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Training checkpoint of llama2.c's train.py: {"model": state_dict, "model_args": {...}}."""
    ma = dict(obj["model_args"])
    args = ModelArgs(
        dim=int(ma["dim"]),
        n_layers=int(ma["n_layers"]),
        n_heads=int(ma["n_heads"]),
        n_kv_heads=int(ma.get("n_kv_heads") or ma["n_heads"]),
        vocab_size=int(ma["vocab_size"]),
        multiple_of=int(ma.get("multiple_of", 256)),
        hidden_dim=ma.get("hidden_dim"),
        norm_eps=float(ma.get("norm_eps", 1e-5)),
        max_seq_len=int(ma.get("max_seq_len", 2048)),
    )
    sd = {}
    for k, v in obj["model"].items():
        k = k.removeprefix("_orig_mod.")  # saved from a torch.compile'd model
        if k.startswith("freqs_"):
            continue
        sd[k] = v
    args.tie_embeddings = _tied(sd)
    return args, sd


def _tied(sd: dict[str, torch.Tensor]) -> bool:
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    if out is None:
        return True
    return emb is not None and out.shape == emb.shape and torch.equal(out, emb)


def looks_like_llama2c_bin(path: Path) -> bool:
    """True if the file's size matches a v0 header's promise exactly, or it starts with the v1/v2 magic."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(28)
    if len(head) < 28:
        return False
    if struct.unpack("<I", head[:4])[0] == MAGIC:
        return True
    try:
        args, shared = _v0_args(struct.unpack("<7i", head))
    except (ValueError, ZeroDivisionError):
        return False
    return size in {28 + 4 * n for n in _v0_float_counts(args, shared)}


def _v0_args(h: tuple[int, ...]) -> tuple[ModelArgs, bool]:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = h
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0 or dim % n_heads:
        raise ValueError("bad header")
    if max(dim, hidden, n_layers, n_heads, abs(vocab), seq_len) > 1 << 22:
        raise ValueError("bad header")
    args = ModelArgs(
        dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=abs(vocab), max_seq_len=seq_len, norm_eps=1e-5, tie_embeddings=vocab > 0,
    )  # fmt: skip
    return args, vocab > 0


def _layer_shapes(a: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    hd = a.head_dim
    return [
        ("attention.wq.weight", (a.n_heads * hd, a.dim)),
        ("attention.wk.weight", (a.n_kv_heads * hd, a.dim)),
        ("attention.wv.weight", (a.n_kv_heads * hd, a.dim)),
        ("attention.wo.weight", (a.dim, a.n_heads * hd)),
        ("feed_forward.w1.weight", (a.hidden_dim, a.dim)),
        ("feed_forward.w2.weight", (a.dim, a.hidden_dim)),
        ("feed_forward.w3.weight", (a.hidden_dim, a.dim)),
    ]


def _v0_float_counts(a: ModelArgs, shared: bool) -> list[int]:
    per_layer = sum(int(np.prod(s)) for _, s in _layer_shapes(a)) + 2 * a.dim
    n = a.vocab_size * a.dim + a.n_layers * per_layer + a.dim + a.max_seq_len * a.head_dim
    if not shared:
        n += a.vocab_size * a.dim
    return [n]


def load_llama2c_bin(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read a llama2.c `.bin` (legacy v0, or v1 fp32 / v2 int8 with the "ak42" header)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if len(data) >= 8 and struct.unpack("<I", data[:4].tobytes())[0] == MAGIC:
        return _load_versioned(path, data)
    args, shared = _v0_args(struct.unpack("<7i", data[:28].tobytes()))
    floats = np.frombuffer(data, dtype=np.float32, offset=28)
    expected = _v0_float_counts(args, shared)[0]
    if floats.size != expected:
        raise TorchchatError(
            f"{path}: llama2.c header promises {expected} floats but the file holds {floats.size}"
        )
    reader = _Reader(floats, path)
    a, L = args, args.n_layers
    sd: dict[str, torch.Tensor] = {"tok_embeddings.weight": reader.take((a.vocab_size, a.dim))}
    _per_layer(sd, "attention_norm.weight", reader.take((L, a.dim)))
    for name, shape in _layer_shapes(a)[:4]:
        _per_layer(sd, name, reader.take((L, *shape)))
    _per_layer(sd, "ffn_norm.weight", reader.take((L, a.dim)))
    for name, shape in _layer_shapes(a)[4:]:
        _per_layer(sd, name, reader.take((L, *shape)))
    sd["norm.weight"] = reader.take((a.dim,))
    reader.take((a.max_seq_len * a.head_dim,))  # freq_cis_real / freq_cis_imag: recomputed
    sd["output.weight"] = (
        sd["tok_embeddings.weight"] if shared else reader.take((a.vocab_size, a.dim))
    )
    args.extra["source_format"] = "llama2c-bin-v0"
    return args, sd


def _load_versioned(path: Path, data: np.ndarray) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    if len(data) < V1_HEADER_BYTES:
        raise TorchchatError(f"{path}: truncated llama2.c header")
    version = struct.unpack("<i", data[4:8].tobytes())[0]
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack(
        "<7i", data[8:36].tobytes()
    )
    shared = bool(data[36])
    try:
        args, _ = _v0_args((dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len))
    except ValueError:
        raise TorchchatError(f"{path}: implausible llama2.c header") from None
    args.tie_embeddings = shared
    a, L = args, args.n_layers
    body = data[V1_HEADER_BYTES:]
    norm_bytes = 4 * (2 * L + 1) * a.dim
    if version == 1:
        if len(body) % 4:
            raise TorchchatError(f"{path}: llama2.c v1 body is not a whole number of floats")
        norms = weights = _Reader(np.frombuffer(body, dtype=np.float32), path)  # one fp32 stream
    elif version == 2:
        group = struct.unpack("<i", data[37:41].tobytes())[0]
        if group <= 0:
            raise TorchchatError(f"{path}: llama2.c v2 group size {group} is invalid")
        norms = _Reader(np.frombuffer(body[:norm_bytes], dtype=np.float32), path)
        weights = _Q80Reader(body[norm_bytes:], group, path)
    else:
        raise TorchchatError(f"{path}: unsupported llama2.c export version {version}")
    sd: dict[str, torch.Tensor] = {}
    _per_layer(sd, "attention_norm.weight", norms.take((L, a.dim)))
    _per_layer(sd, "ffn_norm.weight", norms.take((L, a.dim)))
    sd["norm.weight"] = norms.take((a.dim,))
    sd["tok_embeddings.weight"] = weights.take((a.vocab_size, a.dim))
    for name, shape in _layer_shapes(a):
        for i in range(L):
            sd[f"layers.{i}.{name}"] = weights.take(shape)
    if not shared:
        sd["output.weight"] = weights.take((a.vocab_size, a.dim))
    weights.expect_end()
    if shared:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    args.extra["source_format"] = f"llama2c-bin-v{version}"
    return args, sd


def _per_layer(sd: dict, name: str, stacked: torch.Tensor) -> None:
    for i in range(stacked.shape[0]):
        sd[f"layers.{i}.{name}"] = stacked[i]


class _Reader:
    """Sequential views into a flat float32 array (no copies)."""

    def __init__(self, flat: np.ndarray, path: Path):
        self.flat, self.pos, self.path = flat, 0, path

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape))
        if self.pos + n > self.flat.size:
            raise TorchchatError(f"{self.path}: llama2.c checkpoint is truncated")
        out = torch.from_numpy(np.array(self.flat[self.pos : self.pos + n]).reshape(shape))
        self.pos += n
        return out

    def expect_end(self) -> None:
        if self.pos != self.flat.size:
            raise TorchchatError(
                f"{self.path}: {self.flat.size - self.pos} unexpected trailing floats"
            )


class _Q80Reader:
    """llama2.c v2 tensors: int8 values then fp32 scales per group of `group` values."""

    def __init__(self, body: np.ndarray, group: int, path: Path):
        self.body, self.pos, self.group, self.path = body, 0, group, path

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape))
        if n % self.group:
            raise TorchchatError(
                f"{self.path}: tensor of {n} values is not a multiple of group {self.group}"
            )
        end = self.pos + n + 4 * (n // self.group)
        if end > len(self.body):
            raise TorchchatError(f"{self.path}: llama2.c checkpoint is truncated")
        q = np.frombuffer(self.body[self.pos : self.pos + n].tobytes(), dtype=np.int8).astype(
            np.float32
        )
        s = np.frombuffer(self.body[self.pos + n : end].tobytes(), dtype=np.float32)
        self.pos = end
        return torch.from_numpy((q.reshape(-1, self.group) * s[:, None]).reshape(shape))

    def expect_end(self) -> None:
        if self.pos != len(self.body):
            raise TorchchatError(
                f"{self.path}: {len(self.body) - self.pos} unexpected trailing bytes"
            )
