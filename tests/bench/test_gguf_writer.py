"""The GGUF writer behind `bench --compare llama.cpp`, checked against our own GGUF reader."""

from __future__ import annotations

import pytest
import torch

from tests.support import random_args, run_torchchat
from torchchat.bench.gguf_writer import (
    FILE_TYPES,
    gguf_tensor_name,
    gguf_weight_bytes,
    synthetic_vocab,
    write_gguf,
)
from torchchat.bench.run import random_weights, run_once
from torchchat.builder import build_transformer
from torchchat.checkpoint.gguf import _LAYER_NAME, _LAYER_TENSORS, _TOP_TENSORS, load_gguf
from torchchat.errors import TorchchatError
from torchchat.generate.generator import Generator, Result
from torchchat.model.config import RopeScaling
from torchchat.options import SamplingOptions
from torchchat.runtime.eager import EagerRuntime
from torchchat.tokenizer.gguf import gguf_tokenizer

# Rows of 64 and 96 values: whole Q8_0/Q4_0 blocks of 32; GQA (4 heads, 2 kv heads).
ARGS = dict(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, vocab_size=96)


def tiny(**overrides):
    args = random_args(**{**ARGS, **overrides})
    return args, random_weights(args)


def same_config(a, b) -> bool:
    return {**vars(a), "extra": {}} == {**vars(b), "extra": {}}


@pytest.mark.parametrize(
    "variant",
    [{}, {"tie_embeddings": True}, {"head_dim": 32}, {"rope_theta": 500000.0}],
    ids=["gqa", "tied", "head_dim", "theta"],
)
def test_f32_round_trips_exactly(tmp_path, variant):
    args, sd = tiny(**variant)
    write_gguf(tmp_path / "m.gguf", args, sd, "F32")
    args2, sd2, _ = load_gguf(tmp_path / "m.gguf")
    assert same_config(args, args2)
    assert set(sd2) == set(sd)
    for name, t in sd.items():
        assert torch.equal(sd2[name], t), name


def test_llama3_rope_scaling_round_trips(tmp_path):
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)  # fmt: skip
    args, sd = tiny(rope_scaling=scaling, rope_theta=500000.0)
    write_gguf(tmp_path / "m.gguf", args, sd, "F32")
    args2, _, _ = load_gguf(tmp_path / "m.gguf")
    assert args2.rope_scaling == scaling


@pytest.mark.parametrize(("file_type", "dtype"), [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_16_bit_types_hold_the_cast_weights(tmp_path, file_type, dtype):
    args, sd = tiny()
    write_gguf(tmp_path / "m.gguf", args, sd, file_type)
    _, sd2, info = load_gguf(tmp_path / "m.gguf")
    for name, t in sd.items():
        if t.dim() == 2:
            assert info.tensor_types[name] == file_type
            assert torch.equal(sd2[name], t.to(dtype)), name
        else:  # norms stay F32, as llama.cpp's converters write them
            assert info.tensor_types[name] == "F32" and torch.equal(sd2[name], t)


@pytest.mark.parametrize(("file_type", "levels"), [("Q8_0", 127), ("Q4_0", 8)])
def test_block_types_within_one_step(tmp_path, file_type, levels):
    """Each block of 32 dequantizes to within one step (block max / levels) of the weights."""
    args, sd = tiny()
    write_gguf(tmp_path / "m.gguf", args, sd, file_type)
    _, sd2, info = load_gguf(tmp_path / "m.gguf")
    for name, t in sd.items():
        if t.dim() == 1:
            assert torch.equal(sd2[name], t)
            continue
        assert info.tensor_types[name] == file_type  # embedding and output included
        blocks, back = t.reshape(-1, 32), sd2[name].reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / levels
        assert ((back - blocks).abs() <= step * 1.001).all(), name
        assert not torch.equal(back, blocks)


def test_tensor_names_invert_the_reader():
    _, sd = tiny()
    for name in sd:
        gguf = gguf_tensor_name(name)
        m = _LAYER_NAME.fullmatch(gguf)
        assert (_TOP_TENSORS.get(gguf) or f"layers.{m[1]}.{_LAYER_TENSORS[m[2]]}.{m[3]}") == name


def test_synthetic_vocab_is_llama_shaped(tmp_path):
    tokens, scores, types = synthetic_vocab(32000)
    assert len(tokens) == len(scores) == len(types) == 32000 == len(set(tokens))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 10] == "<0x0A>" and types[13] == 6
    args, sd = tiny(vocab_size=300)
    write_gguf(tmp_path / "m.gguf", args, sd, "F32")
    _, _, info = load_gguf(tmp_path / "m.gguf")
    tok = gguf_tokenizer(info.metadata, "m.gguf")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (300, 1, 2)
    assert tok.decode([tok.bos_id, 299, 298]) == "t299 t298"


def test_rows_not_a_multiple_of_the_block_are_refused(tmp_path):
    args, sd = tiny(hidden_dim=100)
    with pytest.raises(TorchchatError, match="not a multiple of the 32-value block"):
        write_gguf(tmp_path / "m.gguf", args, sd, "Q4_0")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("file_type", list(FILE_TYPES))
def test_weight_bytes_match_what_a_decode_step_reads(tmp_path, file_type):
    args, sd = tiny()
    write_gguf(tmp_path / "m.gguf", args, sd, file_type)
    matrices = [t for n, t in sd.items() if t.dim() == 2 and n != "tok_embeddings.weight"]
    bytes_per_value = {"F32": 4, "F16": 2, "BF16": 2, "Q8_0": 34 / 32, "Q4_0": 18 / 32}
    expected = sum(t.numel() for t in matrices) * bytes_per_value[file_type]
    expected += 4 * sum(t.numel() for t in sd.values() if t.dim() == 1)
    assert gguf_weight_bytes(tmp_path / "m.gguf") == expected
    if file_type == "F32":
        runtime = EagerRuntime(build_transformer(args, sd, torch.float32, "cpu"), 16)
        assert runtime.weight_bytes == expected


def test_f32_file_generates_the_random_models_greedy_tokens(tmp_path):
    """`torchchat generate` on the written file = the in-memory random model, token for token."""
    args, sd = tiny()
    write_gguf(tmp_path / "m.gguf", args, sd, "F32")
    _, _, info = load_gguf(tmp_path / "m.gguf")
    tok = gguf_tokenizer(info.metadata, "m.gguf")
    runtime = EagerRuntime(build_transformer(args, sd, torch.float32, "cpu"), args.max_seq_len)
    result = Result()
    greedy = SamplingOptions(temperature=0)
    gen = Generator(runtime, tok).stream(
        [tok.bos_id], max_new_tokens=20, sampling=greedy, result=result
    )
    text = "".join(gen)
    assert len(result.tokens) >= 5 and len(set(result.tokens)) > 1
    p = run_torchchat("generate", "--gguf-path", tmp_path / "m.gguf", "--prompt", "",
                      "--temperature", "0", "--max-new-tokens", "20", "--quiet")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == text + "\n"
    # The bench's greedy loop agrees, on the random model and on the model read back.
    n = len(result.tokens)
    assert run_once(runtime, [tok.bos_id], n)[2] == result.tokens
    args2, sd2, _ = load_gguf(tmp_path / "m.gguf")
    loaded = EagerRuntime(build_transformer(args2, sd2, torch.float32, "cpu"), args.max_seq_len)
    assert run_once(loaded, [tok.bos_id], n)[2] == result.tokens
