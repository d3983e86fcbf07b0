"""Two real ranks (gloo on 127.0.0.1): sharded models give one process's greedy tokens (quantized
ones' linears bit for bit), and a rank that dies ends the others with an error instead of a hang."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.distributed.ranks import one_thread, spawn
from tests.support import STORIES_BIN, STORIES_TOK, random_args, random_state_dict
from torchchat.builder import build_transformer, model_from_checkpoint
from torchchat.distributed.runtime import TensorParallelRuntime, follow
from torchchat.distributed.sharding import (
    GatheredColumnParallel,
    RowParallel,
    Sharding,
    connect,
    quantizes_linears,
)
from torchchat.errors import TorchchatError
from torchchat.model import transformer
from torchchat.options import DistributionOptions, ModelOptions, QuantizeOptions, SourceOptions
from torchchat.quant.apply import quantize
from torchchat.quant.config import load_quantize_spec
from torchchat.quant.linear import Int8Linear
from torchchat.runtime.eager import EagerRuntime
from torchchat.tokenizer import load_tokenizer

# GQA (8 query heads over 2 key/value heads: one per rank) with attention biases.
ARGS = dict(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=96, vocab_size=128,
            max_seq_len=256, attention_bias=True)  # fmt: skip
PROMPT = [1, 17, 42, 5, 99, 3]
STEPS = 200
INT8 = '{"linear:int8": {"groupsize": 0}}'
INT4 = '{"linear:int4": {"groupsize": 32}}'


def sharding_for(rank: int, world: int, recipe: str | None) -> Sharding:
    """The layout `builder.tensor_parallel_sharding` picks for this recipe."""
    schemes = load_quantize_spec(recipe) if recipe else []
    return Sharding(rank, world, gather=quantizes_linears(schemes))


def build(sharding: Sharding | None, recipe: str | None = None):
    args = random_args(**ARGS)
    sd = random_state_dict(args, seed=5)
    if sharding is not None:
        sd = sharding.state_dict(sd)
    model = build_transformer(args, sd, torch.float32, "cpu", sharding=sharding)
    if recipe:
        quantize(model, load_quantize_spec(recipe))
    return model


def greedy(runtime, prompt=PROMPT, steps=STEPS) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after `prompt` (prefill + decode), then all positions' logits in one forward."""
    with torch.inference_mode():
        tokens = [int(runtime.prefill(torch.tensor([prompt]), 0).argmax())]
        for i in range(steps - 1):
            logits = runtime.decode(torch.tensor([[tokens[-1]]]), len(prompt) + i)
            tokens.append(int(logits.argmax()))
        everything = runtime.forward(torch.tensor([prompt + tokens]), 0)[0]
    return tokens, everything


def tensor_parallel_job(group, recipe, steps):
    model = build(sharding_for(group.rank, group.world, recipe), recipe)
    if group.rank != 0:
        follow(model, group)
        return None
    runtime = TensorParallelRuntime(model, ARGS["max_seq_len"], group)
    layer = runtime.local.model.layers[0]
    # class names with their bases: the runtime gives linears kernel-backed subclasses
    kinds = {
        "wq": [c.__name__ for c in type(layer.attention.wq).__mro__],
        "wo": type(layer.attention.wo).__name__,
        "wo.linear": [c.__name__ for c in type(layer.attention.wo.linear).__mro__],
        "kv_cache": tuple(layer.attention.kv_cache.k.shape),
    }
    tokens, logits = greedy(runtime, steps=steps)
    return tokens, logits, kinds, runtime.peak_rss_per_rank()


@pytest.mark.slow  # spawns two Pythons
@pytest.mark.parametrize(
    "recipe, steps, quantized, wrapper",
    [(None, 40, "Linear", RowParallel), (INT8, STEPS, "Int8Linear", GatheredColumnParallel)],
    ids=["fp32", "int8"],
)
def test_two_ranks_match_one_process(recipe, steps, quantized, wrapper):
    with one_thread():
        ref_tokens, ref_logits = greedy(
            EagerRuntime(build(None, recipe), ARGS["max_seq_len"]), steps=steps
        )
    leader, follower = spawn(tensor_parallel_job, recipe, steps)
    tokens, logits, kinds, rss = leader
    assert follower is None
    assert tokens == ref_tokens
    if recipe is None:  # the all-reduce sums partial products in another order
        assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    else:  # whole rows, the same kernel and scales: the same bits
        assert torch.equal(logits, ref_logits)
    assert quantized in kinds["wq"] and kinds["wo"] == wrapper.__name__
    assert quantized in kinds["wo.linear"]
    assert kinds["kv_cache"] == (1, 1, ARGS["max_seq_len"], 8)  # this rank's 1 of 2 kv heads
    assert len(rss) == 2 and all(mb > 50 for mb in rss)


def stories_prompts() -> list[list[int]]:
    tok = load_tokenizer(STORIES_TOK)
    return [tok.encode(text, bos=True) for text in ("", "Once upon a time")]


TORCH_SILU = torch.nn.functional.silu


def exact_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU whose every element is one function of that element alone: torch's F.silu computes a
    buffer's last elements by its scalar path, an ulp from its vector one, so a rank's half of the
    hidden units gets other ulps than one process's. Computed in fp64 and rounded once."""
    return TORCH_SILU(x.double()).to(x.dtype)


def stories_runs(tp: int, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """stories260K as `generate --quantize RECIPE [--tp 2]` builds it, int8 per channel and
    int4 groups of 32: greedy tokens and logits from each prompt. With tp > 1 every rank runs
    the same loop (the logits are replicated), so the ranks need no orders between models.
    SiLU is `exact_silu` (both processes call this): the ulps of torch's own, rounded to 8 bits
    per 32 values where int4 prefill runs in integers, moved logits by up to 0.36."""
    results = []
    for recipe in (INT8, INT4):
        opts = ModelOptions(
            source=SourceOptions(checkpoint_path=STORIES_BIN),
            quantization=QuantizeOptions(recipe=recipe),
            distribution=DistributionOptions(tp=tp),
        )
        model = model_from_checkpoint(opts)[0]
        if tp > 1:
            connect(model, dist.group.WORLD)
        # the modules in one process too: the fused step (one process only) sums in its own order
        runtime = EagerRuntime(model, 256, fused_decode=False)
        with mock.patch.object(transformer.F, "silu", exact_silu):
            results += [greedy(runtime, prompt) for prompt in prompts]
    return results


def stories_job(group, prompts):
    results = stories_runs(group.world, prompts)
    # Both ranks past their last collective before either leaves the group: a rank that tore
    # it down while its peer was still reading the last all-gather reset the connection under
    # load (gloo on the peer: "Connection reset by peer", and it died).
    dist.barrier()
    return results


@pytest.mark.slow
def test_quantized_stories260K_on_two_ranks_is_one_process():
    """Every linear output element is one process's (whole rows, same kernels and scales): with a
    SiLU that depends on nothing but its element (`exact_silu`), the same greedy tokens and the
    same logits to the bit."""
    prompts = stories_prompts()
    with one_thread():
        expected = stories_runs(1, prompts)
    leader, follower = spawn(stories_job, prompts)
    assert len(leader) == len(expected) == 4
    for (tokens, logits), (ref_tokens, ref_logits) in zip(leader, expected, strict=True):
        assert len(tokens) == STEPS and tokens == ref_tokens
        assert torch.equal(logits, ref_logits)
    assert [t for t, _ in follower] == [t for t, _ in leader]


def test_quantized_linears_in_row_parallel_layout_are_refused():
    model = build(Sharding(0, 2), INT8)  # wo/w2 split by input columns, then quantized
    with pytest.raises(ValueError, match="Sharding\\(gather=True\\)"):
        connect(model, None)


def test_quantizer_finds_the_sharded_linears():
    model = build(sharding_for(1, 2, INT8), INT8)
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    for lin, shape in ((attn.wq, (32, 64)), (attn.wk, (8, 64)), (attn.wo, (32, 64)),
                       (ffn.w1, (48, 64)), (ffn.w2, (32, 96))):  # fmt: skip
        assert isinstance(lin, Int8Linear)
        assert (lin.out_features, lin.in_features) == shape
    assert (attn.n_heads, attn.n_kv_heads) == (4, 1)
    connect(model, None)  # output rows: wrapped in all-gathers (no collective runs here)
    assert isinstance(attn.wo, GatheredColumnParallel) and isinstance(
        ffn.w2, GatheredColumnParallel
    )


def dying_follower_job(group):
    model = build(Sharding(group.rank, group.world))
    if group.rank != 0:
        group.receive()  # the SETUP order, then gone without a word
        os._exit(3)
    runtime = TensorParallelRuntime(model, ARGS["max_seq_len"], group)
    try:
        greedy(runtime)
    except (TorchchatError, RuntimeError) as e:
        return type(e).__name__
    return "no error"


def dying_leader_job(group):
    model = build(Sharding(group.rank, group.world))
    if group.rank == 0:
        TensorParallelRuntime(model, ARGS["max_seq_len"], group)
        os._exit(3)
    try:
        follow(model, group)
    except TorchchatError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_a_dead_follower_fails_rank_0_instead_of_hanging():
    leader, follower = spawn(dying_follower_job, timeout=60, may_die=True)
    assert leader in ("TorchchatError", "RuntimeError") and follower == 3


@pytest.mark.slow
def test_a_dead_rank_0_fails_the_followers_instead_of_hanging():
    leader, follower = spawn(dying_leader_job, timeout=60, may_die=True)
    assert leader == 3 and follower.startswith("lost contact with rank 0")
