"""GGUF test files: the shared real ones, a raw byte-level writer for tiny (and hostile) files,
and a walker that lists where each count, length, dim and offset sits in a header."""

from __future__ import annotations

import ast
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Paths are spelled out here, not imported from tests/conftest.py: with `pytest tests/gguf
# tests/tokenizer` the module named "conftest" is tests/tokenizer/conftest.py.
TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
MODELS = REPO.parent / "shared" / "models"
STORIES_BIN = MODELS / "stories260K" / "stories260K.bin"
STORIES_TOK = MODELS / "stories260K" / "tok512.model"
STORIES_GGUF = MODELS / "stories260K-gguf" / "stories260K.gguf"
VOCAB_SPM_GGUF = MODELS / "ggml-vocab-llama-spm" / "ggml-vocab-llama-spm.gguf"
TINY_F16_GGUF = MODELS / "llama-2-tiny-random-gguf" / "llama-2-tiny-random.gguf"
QUANTS = MODELS / "tiny-random-gguf-quants"
QUANT_NAMES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]  # fmt: skip

# GGUF value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}  # fmt: skip


def enc_str(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(data)) + data


def enc_value(vtype: int, value, etype: int | None = None) -> bytes:
    if vtype == STR:
        return enc_str(value)
    if vtype == ARR:
        body = b"".join(enc_value(etype, v) for v in value)
        return struct.pack("<IQ", etype, len(value)) + body
    return struct.pack(_FMT[vtype], value)


def kv(key: str | bytes, vtype: int, value, etype: int | None = None) -> bytes:
    """One encoded key/value pair."""
    return enc_str(key) + struct.pack("<I", vtype) + enc_value(vtype, value, etype)


@dataclass
class RawTensor:
    """A tensor to write: F32 data unless ggml_type says otherwise; dims/offset may be forged."""

    name: str
    array: np.ndarray
    ggml_type: int = 0
    dims: tuple[int, ...] | None = None
    offset: int | None = None


def build_gguf(
    kvs: list[bytes],
    tensors: list[RawTensor],
    *,
    version: int = 3,
    alignment: int = 32,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A GGUF file's bytes; counts, dims and offsets are the true ones unless overridden."""
    header = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                   len(kvs) if n_kv is None else n_kv)  # fmt: skip
    header += b"".join(kvs)
    infos, data = b"", b""
    for t in tensors:
        blob = t.array.astype(np.float16 if t.ggml_type == 1 else np.float32).tobytes()
        dims = t.dims if t.dims is not None else tuple(reversed(t.array.shape))
        offset = len(data) if t.offset is None else t.offset
        infos += (
            enc_str(t.name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        )
        infos += struct.pack("<IQ", t.ggml_type, offset)
        data += blob + b"\0" * (-len(blob) % alignment)
    out = header + infos
    return out + b"\0" * (-len(out) % alignment) + data


# A valid 1-layer llama: dim 4, 2 heads, ffn 8, an 8-token sentencepiece-style vocabulary.
TINY_TOKENS = ["<unk>", "<s>", "</s>", "\u2581a", "\u2581b", "a", "b", "c"]
TINY_TYPES = [2, 3, 3, 1, 1, 1, 1, 1]


def tiny_kv_table() -> dict[str, tuple]:
    """key -> (vtype, value[, etype]) of the tiny model; edit it, then tiny_gguf(table=...)."""
    return {
        "general.architecture": (STR, "llama"),
        "llama.embedding_length": (U32, 4),
        "llama.feed_forward_length": (U32, 8),
        "llama.block_count": (U32, 1),
        "llama.attention.head_count": (U32, 2),
        "llama.attention.head_count_kv": (U32, 2),
        "llama.context_length": (U32, 16),
        "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
        "tokenizer.ggml.model": (STR, "llama"),
        "tokenizer.ggml.tokens": (ARR, TINY_TOKENS, STR),
        "tokenizer.ggml.scores": (ARR, [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0], F32),
        "tokenizer.ggml.token_type": (ARR, TINY_TYPES, I32),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
    }


def tiny_tensors(seed: int = 0) -> list[RawTensor]:
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return [
        RawTensor("token_embd.weight", r(8, 4)),
        RawTensor("output_norm.weight", r(4)),
        RawTensor("blk.0.attn_norm.weight", r(4)),
        RawTensor("blk.0.attn_q.weight", r(4, 4)),
        RawTensor("blk.0.attn_k.weight", r(4, 4)),
        RawTensor("blk.0.attn_v.weight", r(4, 4)),
        RawTensor("blk.0.attn_output.weight", r(4, 4)),
        RawTensor("blk.0.ffn_norm.weight", r(4)),
        RawTensor("blk.0.ffn_gate.weight", r(8, 4)),
        RawTensor("blk.0.ffn_up.weight", r(8, 4)),
        RawTensor("blk.0.ffn_down.weight", r(4, 8)),
    ]


def tiny_gguf(
    table: dict[str, tuple] | None = None, tensors: list[RawTensor] | None = None, **kw
) -> bytes:
    table = tiny_kv_table() if table is None else table
    kvs = [kv(key, *spec) for key, spec in table.items()]
    return build_gguf(kvs, tiny_tensors() if tensors is None else tensors, **kw)


def header_fields(data: bytes, max_array_items: int = 64) -> list[tuple[str, int, int]]:
    """(kind, offset, width) of the header's structural fields and scalar values, in file order."""
    fields: list[tuple[str, int, int]] = [
        ("version", 4, 4),
        ("tensor_count", 8, 8),
        ("kv_count", 16, 8),
    ]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(kind: str) -> None:
        nonlocal pos
        fields.append((kind, pos, 8))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        string("key length")
        fields.append(("value type", pos, 4))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if vtype == STR:
            string("string length")
        elif vtype == ARR:
            etype, count = struct.unpack_from("<IQ", data, pos)
            fields += [("element type", pos, 4), ("element count", pos + 4, 8)]
            pos += 12
            for i in range(count):
                if etype == STR:
                    if i < max_array_items:
                        string("element length")
                    else:
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                else:
                    pos += struct.calcsize(_FMT[etype])
        else:
            width = struct.calcsize(_FMT[vtype])
            fields.append(("scalar value", pos, width))
            pos += width
    for _ in range(n_tensors):
        string("tensor name length")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append(("n_dims", pos, 4))
        pos += 4
        fields += [("dim", pos + 8 * i, 8) for i in range(n_dims)]
        pos += 8 * n_dims
        fields += [("tensor type", pos, 4), ("tensor offset", pos + 4, 8)]
        pos += 12
    return fields


def llama2c_stories260k() -> str:
    """LLAMA2C_STORIES260K of tests/generate/test_generator.py (llama2.c's run.c output), read
    from its source because importing that module needs the root conftest."""
    tree = ast.parse((TESTS / "generate" / "test_generator.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and getattr(node.targets[0], "id", "") == "LLAMA2C_STORIES260K"
        ):
            return ast.literal_eval(node.value)
    raise LookupError("LLAMA2C_STORIES260K not found in tests/generate/test_generator.py")


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, shift = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return [table[b] for b in range(256)]


def tiny_bpe_vocab_gguf() -> bytes:
    """A vocabulary-only `gpt2` GGUF: bytes, a few merges, Llama 3 style control tokens."""
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ w", "o n", "e r"]
    tokens = byte_level_alphabet() + ["Ġt", "he", "Ġthe", "Ġa", "in", "Ġw", "on", "er"]
    tokens += ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    table = {
        key: spec for key, spec in tiny_kv_table().items() if key.startswith(("general", "llama"))
    }
    table.update(
        {
            "tokenizer.ggml.model": (STR, "gpt2"),
            "tokenizer.ggml.pre": (STR, "llama-bpe"),
            "tokenizer.ggml.tokens": (ARR, tokens, STR),
            "tokenizer.ggml.token_type": (ARR, types, I32),
            "tokenizer.ggml.merges": (ARR, merges, STR),
            "tokenizer.ggml.bos_token_id": (U32, len(tokens) - 3),
            "tokenizer.ggml.eos_token_id": (U32, len(tokens) - 2),
            "tokenizer.ggml.eot_token_id": (U32, len(tokens) - 1),
            "tokenizer.chat_template": (STR, "{{ bos_token }}{{ messages[0].content }}"),
        }
    )
    return build_gguf([kv(key, *spec) for key, spec in table.items()], [])
