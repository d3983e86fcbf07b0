"""Which slice of each weight a rank holds, the shapes that makes, and the errors of --tp."""

from __future__ import annotations

import os

import pytest
import torch

from tests.support import STORIES_BIN, one_line_error, random_args, random_state_dict, run_torchchat
from torchchat.bench.run import random_weights
from torchchat.bench.tensor_parallel import random_shard
from torchchat.builder import build_transformer
from torchchat.distributed.sharding import Sharding
from torchchat.errors import TorchchatError
from torchchat.model.transformer import Transformer
from torchchat.quant.apply import quantize
from torchchat.quant.config import load_quantize_spec


def test_slices_put_back_together_are_the_checkpoint():
    args = random_args(n_heads=4, n_kv_heads=2, attention_bias=True)
    sd = random_state_dict(args)
    parts = [Sharding(r, 2).state_dict(sd) for r in range(2)]
    for name in ("layers.0.attention.wq.weight", "layers.0.attention.wk.bias",
                 "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w3.weight"):  # fmt: skip
        assert torch.equal(torch.cat([p[name] for p in parts], 0), sd[name])
    for name in ("layers.0.attention.wo.weight", "layers.1.feed_forward.w2.weight"):
        assert torch.equal(torch.cat([p[name] for p in parts], 1), sd[name])
    bias = "layers.0.attention.wo.bias"  # row-parallel: added once, after the sum
    assert torch.equal(parts[0][bias], sd[bias]) and not parts[1][bias].any()
    for name in ("tok_embeddings.weight", "output.weight", "layers.0.ffn_norm.weight"):
        assert all(p[name] is sd[name] for p in parts)  # replicated, not copied
    assert all(p["layers.0.attention.wq.weight"].is_contiguous() for p in parts)


def test_shrunk_model_takes_the_slices_and_caches_only_its_heads():
    args = random_args(n_heads=4, n_kv_heads=2, hidden_dim=48)
    sharding = Sharding(1, 2)
    model = build_transformer(
        args, sharding.state_dict(random_state_dict(args)), torch.float32, "cpu", sharding=sharding
    )
    attn = model.layers[0].attention
    assert (attn.n_heads, attn.n_kv_heads) == (2, 1)
    assert attn.wq.weight.shape == (2 * args.head_dim, args.dim)
    assert model.layers[0].feed_forward.w2.weight.shape == (args.dim, 24)
    model.setup_caches(1, 16)
    assert attn.kv_cache.k.shape == (1, 1, 16, args.head_dim)


@pytest.mark.parametrize(
    "overrides, what",
    [
        (dict(n_heads=3, n_kv_heads=3, dim=48), "n_heads (3)"),
        (dict(n_heads=4, n_kv_heads=1), "n_kv_heads (1)"),
        (dict(hidden_dim=47), "hidden_dim (47)"),
        (dict(dim=33, n_heads=2, n_kv_heads=2, head_dim=16), "dim (33)"),  # gather layout only
    ],
)
def test_a_model_that_does_not_split_evenly_is_refused(overrides, what):
    with pytest.raises(TorchchatError) as e:
        Sharding(0, 2, gather=True).check(random_args(**overrides))
    assert str(e.value).startswith(f"--tp 2: the model's {what} is not divisible by 2")


def test_gather_layout_splits_wo_and_w2_by_output_rows():
    args = random_args(n_heads=4, n_kv_heads=2, attention_bias=True)
    sd = random_state_dict(args)
    parts = [Sharding(r, 2, gather=True).state_dict(sd) for r in range(2)]
    for name in ("layers.0.attention.wo.weight", "layers.0.attention.wo.bias",
                 "layers.1.feed_forward.w2.weight", "layers.0.attention.wq.weight"):  # fmt: skip
        assert torch.equal(torch.cat([p[name] for p in parts], 0), sd[name])
    model = build_transformer(args, parts[1], torch.float32, "cpu", sharding=Sharding(1, 2, True))
    assert model.layers[0].attention.wo.weight.shape == (args.dim // 2, args.dim)
    assert model.layers[0].feed_forward.w2.weight.shape == (args.dim // 2, args.hidden_dim)


def quantized_layers(recipe: str, sharding: Sharding | None, args, sd):
    if sharding is not None:
        sd = sharding.state_dict(sd)
    model = build_transformer(args, sd, torch.float32, "cpu", sharding=sharding)
    quantize(model, load_quantize_spec(recipe))
    return model.layers[1].attention.wo, model.layers[1].feed_forward.w2


@pytest.mark.parametrize(
    "recipe, scales, row_dim",  # int8 scales (out,) or (out, groups); int4 (groups, out, 2)
    [
        ('{"linear:int8": {"groupsize": 0}}', "scales", 0),
        ('{"linear:int8": {"groupsize": 32}}', "scales", 0),
        ('{"linear:int4": {"groupsize": 32}}', "scales_and_zeros", 1),
    ],
    ids=["int8", "int8-g32", "int4-g32"],
)
def test_quantized_wo_w2_shards_have_the_one_process_scales(recipe, scales, row_dim):
    args = random_args(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96)
    sd = random_state_dict(args)
    whole = quantized_layers(recipe, None, args, sd)
    for rank in range(2):
        mine = quantized_layers(recipe, Sharding(rank, 2, gather=True), args, sd)
        for full, part in zip(whole, mine, strict=True):  # wo, w2: 32 of 64 output rows each
            expected = getattr(full, scales).narrow(row_dim, rank * 32, 32)
            assert torch.equal(getattr(part, scales), expected)
            assert torch.equal(part.dequantize(), full.dequantize()[rank * 32 : rank * 32 + 32])


def test_row_parallel_int8_scales_would_be_half_rows():
    # Why quantized models use the gather layout: split by input columns, a rank's per-channel
    # scale is the absmax of half a row, not one process's.
    args = random_args(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96)
    sd = random_state_dict(args)
    recipe = '{"linear:int8": {"groupsize": 0}}'
    whole, halves = (quantized_layers(recipe, s, args, sd) for s in (None, Sharding(0, 2)))
    assert whole[0].scales.shape == halves[0].scales.shape
    assert not torch.equal(whole[0].scales, halves[0].scales)


def test_bench_random_shard_is_a_slice_of_bench_random_weights():
    args = random_args(n_heads=4, n_kv_heads=2, tie_embeddings=True)
    full = random_weights(args)
    for rank in range(2):
        sharding = Sharding(rank, 2)
        mine = random_shard(args, sharding)
        expected = sharding.state_dict(full)
        assert mine.keys() == expected.keys()
        assert all(torch.equal(mine[k], expected[k]) for k in mine)
        assert mine["output.weight"] is mine["tok_embeddings.weight"]


def test_meta_shrink_keeps_every_other_module():
    with torch.device("meta"):
        model = Transformer(random_args())
        Sharding(0, 2).shrink(model)
    assert model.tok_embeddings.weight.shape == (96, 32) and model.output.weight.shape == (96, 32)


def test_tp_without_torchrun_says_how_to_launch():
    line = one_line_error(run_torchchat("generate", STORIES_BIN, "--tp", "2"))
    assert "torchrun --nproc-per-node 2 -m torchchat" in line


def test_tp_must_match_the_number_of_processes():
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29555"}  # fmt: skip
    line = one_line_error(
        run_torchchat("generate", STORIES_BIN, "--tp", "2", env={**os.environ, **env})
    )
    assert "--tp 2 but torchrun started 3 processes" in line


def test_tp_only_for_verbs_that_run_the_model():
    line = one_line_error(run_torchchat("convert", STORIES_BIN, "--tp", "2", "--output", "x"))
    assert "--tp applies to generate, chat, eval, bench, server" in line
