"""Hand-made hostile GGUF files: each defect is one TorchchatError line naming the field."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.gguf.gguf_files import (
    ARR,
    F32,
    I32,
    STR,
    U32,
    U64,
    RawTensor,
    build_gguf,
    enc_str,
    kv,
    tiny_gguf,
    tiny_kv_table,
    tiny_tensors,
)
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.gguf_header import validate_gguf
from torchchat.errors import TorchchatError
from torchchat.tokenizer.gguf import gguf_tokenizer


def fails(tmp_path, data: bytes, message: str) -> str:
    """Write data, load it, and return the (one-line) error, which must match message."""
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(TorchchatError, match=message) as info:
        ckpt = load_checkpoint(path)
        gguf_tokenizer(ckpt.extra["gguf"].metadata, str(path))
    text = str(info.value)
    assert "\n" not in text and "\r" not in text and text.startswith(f"{path}: ")
    return text


def with_tensor(target: str, **changes) -> list[RawTensor]:
    tensors = tiny_tensors()
    for t in tensors:
        if t.name == target:
            for k, v in changes.items():
                setattr(t, k, v)
    return tensors


def test_the_tiny_file_itself_is_valid(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(tiny_gguf())
    header = validate_gguf(path)
    assert header.version == 3 and len(header.tensors) == 11
    ckpt = load_checkpoint(path)
    assert ckpt.args.n_layers == 1 and ckpt.args.vocab_size == 8
    assert gguf_tokenizer(ckpt.extra["gguf"].metadata, str(path)).encode("a b") == [3, 4]


def test_five_dims(tmp_path):
    tensors = with_tensor("output_norm.weight", dims=(4, 1, 1, 1, 1))
    fails(
        tmp_path,
        tiny_gguf(tensors=tensors),
        r"GGUF tensor output_norm.weight n_dims: 5 is outside 1..4",
    )


def test_zero_and_huge_dims(tmp_path):
    tensors = with_tensor("output_norm.weight", dims=(4, 0))
    fails(tmp_path, tiny_gguf(tensors=tensors), r"GGUF tensor output_norm.weight dims: dimension 0")
    tensors = with_tensor("output_norm.weight", dims=(2**63,))
    fails(
        tmp_path,
        tiny_gguf(tensors=tensors),
        r"output_norm.weight dims: dimension 9223372036854775808",
    )
    # Each dim fits, the product is astronomically large: Python ints, then the file-size check.
    tensors = with_tensor("output_norm.weight", dims=(2**40, 2**40, 2**40, 2**40))
    fails(
        tmp_path, tiny_gguf(tensors=tensors), r"output_norm.weight offset: \d+ bytes at data offset"
    )


def test_offset_past_the_end_and_misaligned(tmp_path):
    tensors = with_tensor("token_embd.weight", offset=10**6)
    fails(tmp_path, tiny_gguf(tensors=tensors), r"tensor token_embd.weight offset: 128 bytes at data offset 1000000 end past the end")  # fmt: skip
    tensors = with_tensor("token_embd.weight", offset=2**64 - 32)
    fails(tmp_path, tiny_gguf(tensors=tensors), "token_embd.weight offset")
    tensors = with_tensor("token_embd.weight", offset=4)
    fails(tmp_path, tiny_gguf(tensors=tensors), "token_embd.weight offset: 4 is not a multiple of the alignment 32")  # fmt: skip
    fails(tmp_path, tiny_gguf()[:-8], "tensor blk.0.ffn_down.weight offset")  # truncated file


def test_huge_lengths_and_counts(tmp_path):
    big = kv("general.name", STR, "x")
    big = big[: big.index(b"x") - 8] + struct.pack("<Q", 2**62) + b"x"
    data = build_gguf([kv("general.architecture", STR, "llama"), big], [])
    fails(
        tmp_path,
        data,
        r"GGUF general.name: 4611686018427387904 bytes at offset \d+ run past the end",
    )
    huge_key = struct.pack("<Q", 2**64 - 1) + b"k"
    fails(tmp_path, build_gguf([huge_key], []), r"GGUF key #0: length 18446744073709551615 exceeds the limit")  # fmt: skip
    fails(tmp_path, build_gguf([], [], n_kv=2**63), r"GGUF kv_count: 9223372036854775808 key/value pairs cannot fit")  # fmt: skip
    fails(tmp_path, build_gguf([], [], n_tensors=2**40), r"GGUF tensor_count: 1099511627776 tensors cannot fit")  # fmt: skip
    tokens = enc_str("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, STR, 2**60)
    fails(tmp_path, build_gguf([tokens], []), r"GGUF tokenizer.ggml.tokens: 1152921504606846976 strings do not fit")  # fmt: skip
    scores = enc_str("tokenizer.ggml.scores") + struct.pack("<IIQ", ARR, F32, 2**61)
    fails(tmp_path, build_gguf([scores], []), r"GGUF tokenizer.ggml.scores: 2305843009213693952 elements do not fit")  # fmt: skip
    long_name = with_tensor("output_norm.weight", name="x" * 64)
    fails(
        tmp_path,
        tiny_gguf(tensors=long_name),
        r"GGUF tensor #1 name: length 64 exceeds the limit of 63",
    )


def test_duplicates(tmp_path):
    tensors = with_tensor("output_norm.weight", name="blk.0.attn_norm.weight")
    fails(
        tmp_path,
        tiny_gguf(tensors=tensors),
        "GGUF tensor blk.0.attn_norm.weight: duplicate tensor name",
    )
    tensors = with_tensor("output_norm.weight", name="blk.00.attn_norm.weight")
    fails(tmp_path, tiny_gguf(tensors=tensors), "GGUF tensor blk.0.attn_norm.weight: duplicates blk.00.attn_norm.weight")  # fmt: skip
    kvs = [kv("general.architecture", STR, "llama")] * 2
    fails(tmp_path, build_gguf(kvs, []), "GGUF general.architecture: duplicate key")


@pytest.mark.parametrize(
    "key", ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"],
)  # fmt: skip
def test_token_id_not_below_vocab_size(tmp_path, key):
    table = tiny_kv_table()
    table[key] = (U32, 8)
    fails(tmp_path, tiny_gguf(table), rf"GGUF {key}: token id 8 is not below the vocabulary size 8")
    table[key] = (I32, -5)
    fails(tmp_path, tiny_gguf(table), rf"GGUF {key}: token id -5")
    # llama.cpp writes 0xFFFFFFFF for "no such token".
    table[key] = (U32, 2**32 - 1)
    path = tmp_path / "ok.gguf"
    path.write_bytes(tiny_gguf(table))
    load_checkpoint(path)


def test_header_fields(tmp_path):
    path = tmp_path / "not.gguf"
    path.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(TorchchatError, match="GGUF magic: the file does not start with 'GGUF'"):
        validate_gguf(path)
    fails(tmp_path, b"GGUF" + bytes(4), r"GGUF header: file too short \(8 bytes\)")
    fails(tmp_path, build_gguf([], [], version=1), r"GGUF version: 1 is not supported \(2 or 3\)")
    fails(tmp_path, build_gguf([], [], version=3 << 24), "a big-endian file")
    fails(
        tmp_path,
        build_gguf([enc_str("k") + struct.pack("<I", 13)], []),
        "GGUF k: unknown value type 13",
    )
    nested = enc_str("k") + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", U32, 0)
    fails(tmp_path, build_gguf([nested], []), "GGUF k: arrays of arrays are not supported")
    fails(tmp_path, build_gguf([kv(b"\xff\xfe", U32, 1)], []), "GGUF key #0: not valid UTF-8")
    fails(tmp_path, build_gguf([kv("", U32, 1)], []), "GGUF key #0: empty key")
    fails(tmp_path, build_gguf([kv("a\nb", U32, 1)] * 2, []), r"GGUF 'a\\nb': duplicate key")


def test_alignment(tmp_path):
    table = tiny_kv_table()
    table["general.alignment"] = (U32, 24)
    fails(tmp_path, tiny_gguf(table), "GGUF general.alignment: 24 is not a power of two")
    table["general.alignment"] = (U64, 64)
    fails(tmp_path, tiny_gguf(table), "GGUF general.alignment: must be a uint32")
    table["general.alignment"] = (U32, 64)
    path = tmp_path / "ok.gguf"
    path.write_bytes(tiny_gguf(table, alignment=64))
    assert validate_gguf(path).alignment == 64


def test_tensor_types(tmp_path):
    tensors = with_tensor("output_norm.weight", ggml_type=99)
    fails(
        tmp_path,
        tiny_gguf(tensors=tensors),
        "GGUF tensor output_norm.weight type: unknown ggml type 99",
    )
    q4 = RawTensor("output_norm.weight", np.zeros(18 // 4, np.float32), ggml_type=2, dims=(4,))
    tensors = [q4 if t.name == "output_norm.weight" else t for t in tiny_tensors()]
    fails(
        tmp_path,
        tiny_gguf(tensors=tensors),
        "row length 4 is not a multiple of the Q4_0 block size 32",
    )
    iq = RawTensor("output_norm.weight", np.zeros(64, np.float32), ggml_type=20, dims=(256,))
    tensors = [iq if t.name == "output_norm.weight" else t for t in tiny_tensors()]
    fails(tmp_path, tiny_gguf(tensors=tensors), r"output_norm.weight type: IQ4_NL is not supported \(supported: F32, F16")  # fmt: skip


def test_unknown_tensor_and_bad_metadata_types(tmp_path):
    tensors = [*tiny_tensors(), RawTensor("blk.0.ffn_gate_exps.weight", np.zeros(4, np.float32))]
    fails(tmp_path, tiny_gguf(tensors=tensors), "GGUF tensor blk.0.ffn_gate_exps.weight: not a tensor of the llama")  # fmt: skip
    for key, spec, message in [
        ("llama.embedding_length", (STR, "4"), "expected a positive integer"),
        ("llama.block_count", (ARR, [1], U32), "per-layer values are not supported"),
        ("llama.attention.head_count", (U32, 0), "expected a positive integer, got 0"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            (F32, float("nan")),
            "expected a positive finite number, got nan",
        ),
        ("llama.context_length", None, "missing"),
        ("general.architecture", None, "missing or not a string"),
        ("tokenizer.ggml.model", (STR, "bert"), "'bert' is not supported"),
        ("tokenizer.ggml.token_type", (ARR, [1] * 7, I32), "expected an array of 8 values"),
        ("tokenizer.ggml.token_type", (ARR, [9] * 8, I32), "unknown token type 9"),
        ("tokenizer.ggml.scores", (ARR, ["x"] * 8, STR), "expected numbers"),
        ("tokenizer.ggml.tokens", (ARR, ["a"] * 8, STR), "sentencepiece rejects this vocabulary"),
        ("tokenizer.ggml.add_space_prefix", (U32, 1), "expected a bool"),
        ("tokenizer.chat_template", (U32, 1), "expected a string"),
    ]:
        table = tiny_kv_table()
        if spec is None:
            del table[key]
        else:
            table[key] = spec
        fails(tmp_path, tiny_gguf(table), f"GGUF {key}: {message}")


def test_a_bad_string_inside_an_array_is_named_by_its_index(tmp_path):
    """A string array's elements are read in one go each; a defect still names its index."""
    head = enc_str("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, STR, 3) + enc_str("a")
    for tail, message in [
        (enc_str("b") + struct.pack("<Q", 2) + b"\xff\xfe", r"tokens\[2\]: not valid UTF-8"),
        (
            struct.pack("<Q", 1000) + b"xy",
            r"tokens\[1\]: 1000 bytes at offset \d+ run past the end",
        ),
    ]:
        fails(tmp_path, build_gguf([head + tail], []), message)
    ok = head + enc_str("b") + enc_str("\u2581c")
    path = tmp_path / "ok.gguf"
    path.write_bytes(build_gguf([ok], []))
    assert validate_gguf(path).metadata["tokenizer.ggml.tokens"] == ["a", "b", "\u2581c"]
