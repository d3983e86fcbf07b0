"""GGUF checkpoints: config, weights (ggml's dequantization, bit for bit) and greedy tokens."""

from __future__ import annotations

import math
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from tests.gguf.gguf_files import (
    F32,
    QUANT_NAMES,
    QUANTS,
    REPO,
    STORIES_BIN,
    STORIES_GGUF,
    STORIES_TOK,
    STR,
    TINY_F16_GGUF,
    U32,
    RawTensor,
    llama2c_stories260k,
    tiny_gguf,
    tiny_kv_table,
    tiny_tensors,
)
from tests.support import greedy
from torchchat.builder import build_model
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.gguf import llama3_rope_factors
from torchchat.checkpoint.gguf_header import SUPPORTED_TYPES, validate_gguf
from torchchat.errors import TorchchatError
from torchchat.model.config import RopeScaling
from torchchat.model.transformer import rope_frequencies
from torchchat.options import (
    ExecutionOptions,
    ModelOptions,
    QuantizeOptions,
    SamplingOptions,
    SourceOptions,
)

GREEDY = SamplingOptions(temperature=0)
LLAMA2C_STORIES260K = llama2c_stories260k()


def greedy_tokens(built, prompt: list[int], n: int, stops: bool = True) -> list[int]:
    if not stops:  # random weights: keep going past EOS to compare a full n tokens
        built.tokenizer.stop_ids = frozenset()
    return greedy(built, prompt, n)[1].tokens


def test_stories_config_equals_the_bins():
    gguf_args, bin_args = load_checkpoint(STORIES_GGUF).args, load_checkpoint(STORIES_BIN).args
    # llama.cpp's llama2.c converter writes a context of 2048 where the .bin says 512.
    assert (gguf_args.max_seq_len, bin_args.max_seq_len) == (2048, 512)
    skip = ("max_seq_len", "extra")
    g, b = gguf_args.to_dict(), bin_args.to_dict()
    assert {k: v for k, v in g.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }
    # output.weight is a byte-for-byte copy of token_embd: loaded as one tied tensor.
    assert gguf_args.tie_embeddings


def test_stories_tensors_are_bit_identical_to_the_bins():
    g, b = load_checkpoint(STORIES_GGUF), load_checkpoint(STORIES_BIN)
    assert g.format == "gguf" and set(g.state_dict) == set(b.state_dict)
    for name, t in b.state_dict.items():
        assert g.state_dict[name].dtype == torch.float32
        assert torch.equal(g.state_dict[name], t), name


def test_stories_greedy_with_its_own_vocabulary_matches_the_bin():
    from_gguf = build_model(ModelOptions(SourceOptions(gguf_path=STORIES_GGUF)))
    from_bin = build_model(
        ModelOptions(SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK))
    )
    assert from_gguf.tokenizer.kind == "sentencepiece" and from_gguf.tokenizer.vocab_size == 512
    prompt = from_gguf.tokenizer.encode("", bos=True)
    assert prompt == [1] == from_bin.tokenizer.encode("", bos=True)
    tokens = greedy_tokens(from_gguf, prompt, 200)
    assert tokens == greedy_tokens(from_bin, prompt, 200)
    assert from_gguf.tokenizer.decode(tokens) == LLAMA2C_STORIES260K


def test_gguf_positional_folder_detection():
    assert load_checkpoint(STORIES_GGUF.parent).format == "gguf"


def test_every_supported_tensor_type_is_exercised():
    seen = set()
    for name in QUANT_NAMES:
        info = load_checkpoint(QUANTS / f"tiny-random-{name}.gguf").extra["gguf"]
        seen |= set(info.tensor_types.values())
    assert seen | {"F32"} == {t.name for t in SUPPORTED_TYPES}


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_dequantized_weights_and_greedy_tokens_equal_llama_cpps_f32(name):
    quant = load_checkpoint(QUANTS / f"tiny-random-{name}.gguf")
    ref = load_checkpoint(QUANTS / f"tiny-random-{name}-F32.gguf")
    assert set(ref.extra["gguf"].tensor_types.values()) == {"F32"}
    assert set(quant.state_dict) == set(ref.state_dict)
    types = quant.extra["gguf"].tensor_types
    for key, t in ref.state_dict.items():
        q = quant.state_dict[key]
        # F16/BF16 stay in their own dtype (exact); quantized types come back as fp32.
        assert q.dtype == {"F16": torch.float16, "BF16": torch.bfloat16}.get(
            types[key], torch.float32
        )
        assert q.shape == t.shape and torch.equal(q.float(), t), key

    prompt = [1, 403, 407, 261, 378, 30, 290, 333]
    runs = [  # --gguf-dequantize: ggml's float weights exactly (the blocks' own path quantizes
        build_model(  # activations as ggml does: tests/gguf/test_llamacpp_logits.py)
            ModelOptions(
                source=SourceOptions(gguf_path=c.path),
                quantization=QuantizeOptions(gguf_dequantize=True),
                execution=ExecutionOptions(dtype="fp32"),
            )
        )
        for c in (quant, ref)
    ]
    tokens, expected = (greedy_tokens(built, prompt, 30, stops=False) for built in runs)
    assert len(tokens) == 30 and tokens == expected


def test_llama2_tiny_random_f16_loads_and_generates():
    ckpt = load_checkpoint(TINY_F16_GGUF)
    assert ckpt.args.vocab_size == 32000 and ckpt.args.dim == 8
    assert ckpt.state_dict["tok_embeddings.weight"].dtype == torch.float16
    assert ckpt.state_dict["norm.weight"].dtype == torch.float32
    built = build_model(
        ModelOptions(
            source=SourceOptions(gguf_path=TINY_F16_GGUF), execution=ExecutionOptions(dtype="fp32")
        )
    )
    assert built.tokenizer.vocab_size == 32000
    prompt = built.tokenizer.encode("Hello world", bos=True)
    assert prompt == [1, 15043, 3186]  # the Llama 2 vocabulary
    assert len(greedy_tokens(built, prompt, 10)) == 10


@pytest.mark.parametrize("path", [STORIES_GGUF, QUANTS / "tiny-random-Q4_K_M.gguf"])
def test_header_parse_agrees_with_gguf_reader(path):
    header, reader = validate_gguf(path), gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.metadata.keys() == fields.keys()
    for key, value in fields.items():
        ours = header.metadata[key]
        if isinstance(value, float):  # float32 scalars: ours is the shortest round-trip decimal
            assert np.float32(ours) == np.float32(value), key
        else:
            assert ours == value, key
    assert header.data_start == reader.data_offset
    assert [(t.name, t.ggml_type, list(t.dims), t.offset, t.nbytes) for t in header.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.n_bytes) for t in reader.tensors
    ]


def test_tiny_file_without_output_is_tied(tmp_path):
    path = tmp_path / "tied.gguf"
    path.write_bytes(tiny_gguf())
    ckpt = load_checkpoint(path)
    assert ckpt.args.tie_embeddings
    assert ckpt.state_dict["output.weight"] is ckpt.state_dict["tok_embeddings.weight"]
    untied = tiny_tensors() + [RawTensor("output.weight", np.ones((8, 4), np.float32))]
    path.write_bytes(tiny_gguf(tensors=untied))
    ckpt = load_checkpoint(path)
    assert not ckpt.args.tie_embeddings and ckpt.state_dict["output.weight"].sum() == 32
    built = build_model(ModelOptions(SourceOptions(gguf_path=path)))
    assert built.tokenizer.encode("a b", bos=True) == [1, 3, 4]


def converter_rope_factors(scaling: RopeScaling, base: float, dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, loop for loop."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(scaling.factor)
        else:
            smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            rope_factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


def rope_file(tmp_path, factors: np.ndarray, head_dim: int, theta: float):
    """The tiny model with one head of head_dim and a rope_freqs.weight tensor."""
    table = tiny_kv_table()
    table["llama.rope.freq_base"] = (F32, theta)
    table["llama.attention.key_length"] = (U32, head_dim)
    table["llama.attention.value_length"] = (U32, head_dim)
    tensors = tiny_tensors()
    for t in tensors:  # q/k/v/o now map 4 <-> 2 heads x head_dim
        if t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")):
            t.array = np.zeros((2 * head_dim, 4), np.float32)
        elif t.name.endswith("attn_output.weight"):
            t.array = np.zeros((4, 2 * head_dim), np.float32)
    path = tmp_path / "rope.gguf"
    path.write_bytes(tiny_gguf(table, [*tensors, RawTensor("rope_freqs.weight", factors)]))
    return path


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 and 3.2
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, factor):
    scaling = RopeScaling(factor, 1.0, 4.0, 8192)
    factors = converter_rope_factors(scaling, 500000.0, 128)
    assert len(np.unique(factors)) > 1 and np.array_equal(llama3_rope_factors(scaling, 500000.0, 128), factors)  # fmt: skip
    ckpt = load_checkpoint(rope_file(tmp_path, factors, 128, 500000.0))
    assert ckpt.args.rope_scaling == scaling and ckpt.args.head_dim == 128
    assert "rope_freqs.weight" not in ckpt.state_dict
    # llama.cpp divides each frequency by its factor: our table rotates by the same angles.
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    ours = rope_frequencies(ckpt.args, 2)[1]  # position 1: (cos, sin) of each frequency
    torch.testing.assert_close(torch.atan2(ours[:, 1], ours[:, 0]), base / torch.from_numpy(factors), rtol=1e-6, atol=0)  # fmt: skip
    built = build_model(
        ModelOptions(
            source=SourceOptions(gguf_path=ckpt.path), execution=ExecutionOptions(max_seq_length=16)
        )
    )
    assert built.args.rope_scaling == scaling


def test_rope_freqs_with_other_parameters_and_small_heads(tmp_path):
    fitted = RopeScaling(16.0, 2.0, 8.0, 8192)
    ckpt = load_checkpoint(rope_file(tmp_path, converter_rope_factors(fitted, 500000.0, 128), 128, 500000.0))  # fmt: skip
    assert ckpt.args.rope_scaling == fitted
    # head_dim 8: no frequency falls in the blend, the Llama 3 defaults reproduce the factors.
    small = converter_rope_factors(RopeScaling(8.0, 1.0, 4.0, 8192), 10000.0, 8)
    assert load_checkpoint(rope_file(tmp_path, small, 8, 10000.0)).args.rope_scaling.factor == 8.0
    ones = np.ones(4, np.float32)
    assert load_checkpoint(rope_file(tmp_path, ones, 8, 10000.0)).args.rope_scaling is None


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path):
    factors = np.linspace(1.0, 3.0, 64, dtype=np.float32)
    with pytest.raises(TorchchatError, match=r"GGUF tensor rope_freqs\.weight: per-frequency"):
        load_checkpoint(rope_file(tmp_path, factors, 128, 500000.0))
    with pytest.raises(TorchchatError, match=r"rope_freqs\.weight: shape \[4\]"):
        load_checkpoint(rope_file(tmp_path, np.ones(4, np.float32), 128, 500000.0))


LINEAR = {"llama.rope.scaling.type": (STR, "linear"), "llama.rope.scaling.factor": (F32, 2.0)}


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        (
            {"general.architecture": (STR, "qwen2")},
            r"'qwen2' is not supported \(supported: llama\)",
        ),
        (LINEAR, r"llama.rope.scaling.type: 'linear' RoPE scaling \(factor 2.0\) is not supported"),
        ({"llama.rope.scaling.factor": (F32, 4.0)}, "'linear' RoPE scaling"),
        ({"llama.rope.scaling.type": (STR, "yarn")}, "'yarn' RoPE scaling"),
        ({"llama.rope.dimension_count": (U32, 1)}, "partial RoPE"),
        ({"llama.expert_count": (U32, 8)}, "mixture-of-experts"),
        ({"llama.attention.head_count_kv": (U32, 3)}, "not a multiple of 3"),
        ({"llama.block_count": (U32, 4)}, r"llama.block_count: 4 layers"),
        ({"llama.vocab_size": (U32, 9)}, "llama.vocab_size: 9 but tokenizer.ggml.tokens has 8"),
    ],
)
def test_unsupported_configs_are_clean_errors(tmp_path, updates, message):
    table = tiny_kv_table()
    table.update(updates)
    path = tmp_path / "x.gguf"
    path.write_bytes(tiny_gguf(table))
    with pytest.raises(TorchchatError, match=message):
        load_checkpoint(path)


def test_linear_scaling_of_one_is_plain_rope(tmp_path):
    # llama.cpp reads a factor of 1 (or 0) as no scaling.
    table = tiny_kv_table()
    table["llama.rope.scaling.type"] = (STR, "linear")
    table["llama.rope.scaling.factor"] = (F32, 1.0)
    path = tmp_path / "x.gguf"
    path.write_bytes(tiny_gguf(table))
    assert load_checkpoint(path).args.rope_scaling is None


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchchat", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.parametrize("how", ["--gguf-path", "positional"])
def test_cli_generates_llama2cs_story_from_the_gguf(how):
    model = ["--gguf-path", STORIES_GGUF] if how == "--gguf-path" else [STORIES_GGUF]
    p = run_cli("generate", *model, "--prompt", "", "--temperature", "0", "--max-new-tokens", "200")
    assert p.returncode == 0, p.stderr
    assert p.stdout == LLAMA2C_STORIES260K + "\n"


def test_cli_hostile_gguf_is_one_line_exit_1(tmp_path):
    path = tmp_path / "bad.gguf"
    data = bytearray(STORIES_GGUF.read_bytes()[:20000])
    path.write_bytes(bytes(data))
    p = run_cli("generate", "--gguf-path", path, "--prompt", "x")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "GGUF tensor token_embd.weight offset" in p.stderr


def test_tokenizer_path_overrides_the_gguf_vocabulary():
    built = build_model(
        ModelOptions(SourceOptions(gguf_path=STORIES_GGUF, tokenizer_path=STORIES_TOK))
    )
    assert built.tokenizer.path == STORIES_TOK


def test_attention_biases_load_and_missing_ones_are_zero(tmp_path):
    biases = [RawTensor(f"blk.0.attn_{p}.bias", np.full(4, 0.5, np.float32)) for p in "qkv"]
    path = tmp_path / "bias.gguf"
    path.write_bytes(tiny_gguf(tensors=tiny_tensors() + biases))
    ckpt = load_checkpoint(path)
    assert ckpt.args.attention_bias
    assert torch.equal(ckpt.state_dict["layers.0.attention.wk.bias"], torch.full((4,), 0.5))
    assert torch.equal(ckpt.state_dict["layers.0.attention.wo.bias"], torch.zeros(4))
    assert (
        len(
            greedy_tokens(
                build_model(ModelOptions(SourceOptions(gguf_path=path))), [1], 3, stops=False
            )
        )
        == 3
    )
