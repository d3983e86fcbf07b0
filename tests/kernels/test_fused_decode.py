"""The fused one-token decode step (torchchat::decode_layers) against the model's modules, on
every kernel level this machine runs."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_kernels import max_rel
from tests.support import random_args, random_state_dict
from torchchat import kernels
from torchchat.kernels import fused
from torchchat.model.transformer import Transformer
from torchchat.quant.apply import quantize
from torchchat.quant.config import load_quantize_spec
from torchchat.runtime.base import SeqChunk
from torchchat.runtime.eager import EagerRuntime

pytestmark = pytest.mark.skipif(
    kernels.simd_level() == 0, reason="torchchat's CPU kernels are off on this machine"
)

FUSED_SPECS = [
    (None, None, 1e-5),
    (
        None,
        torch.bfloat16,
        2e-2,
    ),  # a 1-ulp bf16 rounding flip (sums in another order) moves a logit
    (None, torch.float16, 2e-3),
    ('{"linear:int8": {"groupsize": 0}}', torch.bfloat16, 2e-2),
    ('{"linear:int8": {"groupsize": 32}}', None, 1e-5),
    ('{"linear:int4": {"groupsize": 32}}', torch.bfloat16, 2e-2),
    # an fp32 model: its scales stay bf16, so its modules run the int4 kernels the step runs;
    # where those round x to 8 bits, a sum in another order upstream may flip one code
    ('{"linear:int4": {"groupsize": 32}}', None, 2e-2),
    ('{"linear:8da4w": {"groupsize": 32}}', torch.bfloat16, 2e-2),
]


@torch.inference_mode()
def runtime_prefill_then_decode(runtime, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """prefill_then_decode through a runtime: its decode steps are the ones it may fuse."""
    out = [runtime.prefill(tokens[:, :prompt], 0)]
    out += [runtime.decode(tokens[:, p : p + 1], p) for p in range(prompt, tokens.shape[1])]
    return torch.stack(out)


def fused_model(spec, dtype, **shape) -> Transformer:
    args = random_args(**{"dim": 64, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 176,
                          "vocab_size": 128, **shape})  # fmt: skip
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=5))
    if spec:
        quantize(model, load_quantize_spec(spec))
    model = model.to(dtype or torch.float32).eval()
    model.setup_caches(1, 40)
    return model


def teacher_forced(model: Transformer, fused: bool, monkeypatch) -> tuple[torch.Tensor, list]:
    """Logits of a 10-token prefill and 8 decode steps on fixed tokens, with the fused step on
    or off (counting its calls), and the KV caches after."""
    calls = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: calls.append(1) or real(*a))
    runtime = EagerRuntime(model, 40, fused_decode=fused)
    assert runtime.fused_decode is fused
    tokens = torch.randint(0, 128, (1, 18), generator=torch.Generator().manual_seed(2))
    logits = runtime_prefill_then_decode(runtime, tokens, 10)
    assert len(calls) == (8 if fused else 0)
    caches = [t.clone() for layer in model.layers for t in (layer.attention.kv_cache.k,
                                                            layer.attention.kv_cache.v)]  # fmt: skip
    model.setup_caches(1, 40)  # fresh caches for the next run
    return logits, caches


@pytest.mark.parametrize("spec,dtype,tol", FUSED_SPECS)
@pytest.mark.parametrize(
    "shape",
    [{}, {"dim": 256, "n_heads": 2, "n_kv_heads": 1}, {"dim": 400, "n_heads": 2, "n_kv_heads": 2}],
    ids=["gqa-hd16", "hd128", "hd200"],
)
@pytest.mark.usefixtures("isa")
def test_fused_decode_matches_the_modules(spec, dtype, tol, shape, monkeypatch):
    """Every layer of a decode step in one kernel call: the same logits and cache rows as the
    modules, step after step (fp32 to rounding, 16-bit to a rounding flip)."""
    if spec and "4" in spec and not kernels.simd_level() & kernels.INT4:
        pytest.skip(f"the {kernels.isa()} kernels have no int4 linear")
    model = fused_model(spec, dtype, **shape)
    ref, ref_caches = teacher_forced(model, False, monkeypatch)
    got, got_caches = teacher_forced(model, True, monkeypatch)
    assert max_rel(got, ref) < tol
    for a, b in zip(got_caches, ref_caches, strict=True):
        assert max_rel(a, b) < tol


def paged_runtime(model: Transformer, fused: bool, monkeypatch, blocks: int):
    """A runtime with a pool of `blocks` 4-position blocks, and the list its fused paged calls
    are counted into."""
    calls: list[int] = []
    real = kernels.decode_layers_paged
    monkeypatch.setattr(kernels, "decode_layers_paged", lambda *a: calls.append(1) or real(*a))
    runtime = EagerRuntime(model, 40, fused_decode=fused)
    runtime.setup_paged(4, blocks)
    runtime.reserve_blocks(blocks)
    return runtime, calls


def paged_run(
    model: Transformer, fused: bool, monkeypatch, n: int = 7
) -> tuple[torch.Tensor, list, int]:
    """n sequences of different lengths (block tables out of order) prefilled in one paged step,
    then 6 decode steps of all of them on fixed tokens: the logits of every step, the pools
    after, and how many fused paged calls ran (one a step for up to 24 sequences)."""
    runtime, calls = paged_runtime(model, fused, monkeypatch, 8 * n)
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(8 * n, generator=gen).tolist()
    tables = [order[8 * i : 8 * i + 8] for i in range(n)]
    prompts = [torch.randint(0, 128, (1 + 2 * (i % 10),), generator=gen).tolist() for i in range(n)]
    logits = runtime.step([SeqChunk(i, p, 0, tables[i]) for i, p in enumerate(prompts)])
    out, pos = [logits], [len(p) for p in prompts]
    fed = torch.randint(0, 128, (6, n), generator=gen).tolist()
    for step in fed:
        out.append(runtime.step([SeqChunk(i, [t], pos[i], tables[i]) for i, t in enumerate(step)]))
        pos = [p + 1 for p in pos]
    pools = [t.clone() for layer in model.layers for t in (layer.attention.paged.k,
                                                           layer.attention.paged.v)]  # fmt: skip
    return torch.stack(out), pools, len(calls)


@pytest.mark.parametrize("spec,dtype,tol", FUSED_SPECS)
@pytest.mark.usefixtures("isa")
def test_fused_paged_step_matches_the_modules(spec, dtype, tol, monkeypatch):
    """One token of each of 7 sequences in a paged pool, all layers in one kernel call: the
    logits and pool rows of the modules' paged step (their linears on the same few-row
    kernels)."""
    if spec and "4" in spec and not kernels.simd_level() & kernels.INT4:
        pytest.skip(f"the {kernels.isa()} kernels have no int4 linear")
    model = fused_model(spec, dtype)
    ref, ref_pools, none = paged_run(model, False, monkeypatch)
    got, got_pools, calls = paged_run(model, True, monkeypatch)
    assert (none, calls) == (0, 6)
    assert max_rel(got, ref) < tol
    for a, b in zip(got_pools, ref_pools, strict=True):
        assert max_rel(a, b) < tol


@pytest.mark.parametrize("spec,dtype,tol", FUSED_SPECS)
@pytest.mark.usefixtures("isa")
def test_a_call_of_more_than_8_rows_gives_what_its_calls_of_8_give(spec, dtype, tol, monkeypatch):
    """One fused paged call of 19 sequences' tokens (its linears over rows 0-7, 8-15 and 16-18)
    gives, to the bit, the hidden states and pool rows of calls of 8, 8 and 3 of them: a row's
    sums do not depend on the row group it is in."""
    if spec and "4" in spec and not kernels.simd_level() & kernels.INT4:
        pytest.skip(f"the {kernels.isa()} kernels have no int4 linear")
    model = fused_model(spec, dtype)
    runtime, _ = paged_runtime(model, True, monkeypatch, 8 * 19)
    gen = torch.Generator().manual_seed(5)
    tables = torch.randperm(8 * 19, generator=gen).view(19, 8)
    prompts = [torch.randint(0, 128, (1 + i,), generator=gen).tolist() for i in range(19)]
    runtime.step([SeqChunk(i, p, 0, tables[i].tolist()) for i, p in enumerate(prompts)])
    pos = torch.tensor([len(p) for p in prompts])
    index = (tables[:, :, None] * 4 + torch.arange(4)).view(19, -1)
    x = model.tok_embeddings(torch.randint(0, 128, (19,), generator=gen))
    pools = [layer.attention.paged for layer in model.layers]
    before = [(p.k.clone(), p.v.clone()) for p in pools]

    def run(parts):
        for p, (k, v) in zip(pools, before, strict=True):
            p.k.copy_(k), p.v.copy_(v)
        h = [
            fused.decode_step_paged(
                runtime._plan,
                x[a:b],
                model.freqs,
                pos[a:b],
                index[a:b],
                [p.k for p in pools],
                [p.v for p in pools],
            )  # fmt: skip
            for a, b in parts
        ]
        return torch.cat(h), [t.clone() for p in pools for t in (p.k, p.v)]

    whole, whole_pools = run([(0, 19)])
    parts, parts_pools = run([(0, 8), (8, 16), (16, 19)])
    assert torch.equal(whole, parts)
    assert all(torch.equal(a, b) for a, b in zip(whole_pools, parts_pools, strict=True))


@pytest.mark.usefixtures("isa")
def test_fused_paged_step_takes_24_sequences_a_call(monkeypatch):
    """24 sequences: one call a step (its linears over 8 rows at a time), the modules' logits
    (theirs on torch's GEMM for 24 rows) to fp32 rounding; 25 go on the modules."""
    model = fused_model(None, None)
    ref, ref_pools, _ = paged_run(model, False, monkeypatch, n=24)
    got, got_pools, calls = paged_run(model, True, monkeypatch, n=24)
    assert calls == 6
    assert max_rel(got, ref) < 1e-5
    for a, b in zip(got_pools, ref_pools, strict=True):
        assert max_rel(a, b) < 1e-5
    assert paged_run(model, True, monkeypatch, n=25)[2] == 0


def mixed_run(model: Transformer, fused: bool, monkeypatch) -> tuple[list, list, int]:
    """3 sequences prefilled (27 tokens: the modules' step), then a step of their 3 decodes and
    a 4th sequence's 9-token prompt (12 tokens in one call: the linears' rows 0-7 and 8-11, the
    prompt split across two of their row groups), then 2 decode steps of all 4: each step's
    logits, the pools, the fused calls."""
    runtime, calls = paged_runtime(model, fused, monkeypatch, 32)
    gen = torch.Generator().manual_seed(4)
    tables = [torch.randperm(32, generator=gen)[:8].tolist()]
    rest = [b for b in range(32) if b not in tables[0]]
    tables += [rest[8 * i : 8 * i + 8] for i in range(3)]
    seqs = [torch.randint(0, 128, (14,), generator=gen).tolist() for _ in range(4)]
    out = [runtime.step([SeqChunk(i, seqs[i][:9], 0, tables[i]) for i in range(3)])]
    chunks = [SeqChunk(i, [seqs[i][9]], 9, tables[i]) for i in range(3)]
    out.append(runtime.step([*chunks, SeqChunk(3, seqs[3][:9], 0, tables[3])]))
    for step in range(2):
        out.append(
            runtime.step(
                [SeqChunk(i, [seqs[i][10 + step]], 10 + step, tables[i]) for i in range(3)]
                + [SeqChunk(3, [seqs[3][9 + step]], 9 + step, tables[3])]
            )
        )
    pools = [t.clone() for layer in model.layers for t in (layer.attention.paged.k,
                                                           layer.attention.paged.v)]  # fmt: skip
    return out, pools, len(calls)


@pytest.mark.usefixtures("isa")
def test_a_prompt_chunk_shares_the_fused_step_with_decodes(monkeypatch):
    """A prompt chunk's tokens are rows of the fused step beside other sequences' decodes, the
    chunk causal within the call: the modules' logits and pools to fp32 rounding."""
    model = fused_model(None, None)
    ref, ref_pools, none = mixed_run(model, False, monkeypatch)
    got, got_pools, calls = mixed_run(model, True, monkeypatch)
    assert (none, calls) == (0, 3)  # a call each step
    for a, b in zip(got, ref, strict=True):
        assert max_rel(a, b) < 1e-5
    for a, b in zip(got_pools, ref_pools, strict=True):
        assert max_rel(a, b) < 1e-5


@pytest.mark.usefixtures("isa")
def test_decode_layers_paged_rejects_what_it_cannot_read():
    model = fused_model(None, None)
    runtime = EagerRuntime(model, 40)
    runtime.setup_paged(4, 4)
    runtime.reserve_blocks(4)
    p = runtime._plan
    pools = [layer.attention.paged for layer in model.layers]

    def call(rows=2, pos=(3, 5), index=None):
        index = torch.arange(16).repeat(len(pos), 1) if index is None else index
        return torch.ops.torchchat.decode_layers_paged(
            torch.zeros(rows, 64), p.norms, 1e-5, model.freqs, torch.tensor(pos), index,
            [t.k for t in pools], [t.v for t in pools], p.weights, [], 0, 0, 4,
        )  # fmt: skip

    assert call().shape == (2, 64)
    with pytest.raises(RuntimeError, match=r"x must be \(1 to 24, dim\)"):
        call(rows=25, pos=(3,) * 25)
    with pytest.raises(RuntimeError, match="position 16 is outside the index"):
        call(pos=(3, 16))
    outside = torch.arange(16).repeat(2, 1)
    outside[1, 5] = 16  # the pool has 16 rows; row 1 reads (and writes) position 5
    with pytest.raises(RuntimeError, match="index 16 outside the pool"):
        call(index=outside)
    outside[1, 5], outside[1, 6] = 5, 16  # past its position: never read
    assert call(index=outside).shape == (2, 64)
    with pytest.raises(RuntimeError, match="pos must be 2 int64"):
        call(pos=(3,), index=torch.arange(16).repeat(2, 1))


def test_int4_blocked_scales_put_each_blocks_pairs_together():
    groups, n = 3, 64 * 2 + 48  # two full blocks and a tail of 48 rows
    sz = torch.arange(groups * n * 2, dtype=torch.float32).view(groups, n, 2).to(torch.bfloat16)
    flat = kernels.int4_blocked_scales(sz).reshape(-1)
    for g, row in [(0, 0), (2, 63), (1, 64), (2, 100), (0, 128), (1, 150), (2, 175)]:
        n0 = row // 64 * 64
        bs = min(64, n - n0)
        at = (n0 * groups + g * bs + row - n0) * 2  # kernels.h's int4_scale_offset + row
        assert torch.equal(flat[at : at + 2], sz[g, row])


@pytest.mark.usefixtures("isa")
def test_decode_layers_rejects_inconsistent_arguments():
    model = fused_model(None, None)
    runtime = EagerRuntime(model, 40)
    assert runtime.fused_decode
    p, x = runtime._plan, torch.zeros(1, 1, 64)

    def call(pos=3, weights=None, k_caches=None):
        return torch.ops.torchchat.decode_layers(
            x, p.norms, 1e-5, model.freqs, model.causal_mask, torch.tensor([pos]),
            k_caches or p.k_caches, p.v_caches, weights or p.weights, [], 0, 0, 4,
        )  # fmt: skip

    with pytest.raises(RuntimeError, match="2 layers need 4 norms, 14 weights"):
        call(weights=p.weights[:7])
    with pytest.raises(RuntimeError, match="position 40 is outside the cache"):
        call(pos=40)
    with pytest.raises(RuntimeError, match="caches must all be contiguous"):
        call(k_caches=[p.k_caches[0], p.k_caches[1].transpose(2, 3)])
    swapped = list(p.weights)
    swapped[3], swapped[6] = swapped[6], swapped[3]  # wo and w2
    with pytest.raises(RuntimeError, match="weight 3 must be"):
        call(weights=swapped)
