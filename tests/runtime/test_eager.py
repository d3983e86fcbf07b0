"""EagerRuntime: where it runs the fused one-token step, and that its plan never goes stale."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_fused_decode import fused_model, runtime_prefill_then_decode
from tests.kernels.test_kernels import max_rel
from tests.support import STORIES_BIN, greedy, random_state_dict
from torchchat import kernels
from torchchat.model.transformer import Transformer
from torchchat.quant.apply import quantize
from torchchat.quant.config import load_quantize_spec
from torchchat.quant.linear import Int8Linear
from torchchat.runtime.eager import EagerRuntime

pytestmark = pytest.mark.skipif(
    kernels.simd_level() == 0, reason="torchchat's CPU kernels are off on this machine"
)


def test_fused_decode_applies_only_where_it_runs_the_same_model():
    model = fused_model(None, None)
    runtime = EagerRuntime(model, 40)
    assert runtime.fused_decode
    model.setup_caches(2, 40)  # two sequences: the fused step is for one
    assert not runtime.fuse_decode()
    model.setup_caches(1, 40)
    handle = model.layers[1].feed_forward.w2.register_forward_hook(lambda *a: None)
    assert not EagerRuntime(model, 40).fused_decode  # a hook must see its module run
    handle.remove()
    model.layers[0].attention.wo = Int8Linear.from_float(model.layers[0].attention.wo, 0)
    assert not EagerRuntime(model, 40).fused_decode  # mixed kinds of linears
    assert not EagerRuntime(fused_model(None, None, attention_bias=True), 40).fused_decode
    if kernels.simd_level() & kernels.INT4:  # int4 scales that are not bf16 values
        model = fused_model('{"linear:int4": {"groupsize": 32}}', None)
        wq = model.layers[0].attention.wq
        wq.scales_and_zeros = wq.scales_and_zeros.float()  # as a checkpoint may hold them
        wq.scales_and_zeros[0, 0, 0] += 1e-6
        assert not EagerRuntime(model, 40).fused_decode


def test_fused_decode_gives_the_modules_greedy_tokens_on_stories260k():
    """The real checkpoint, 200 greedy tokens: fp32 (llama2.c's tokens, test_generator), int8,
    bf16 with int4 weights."""
    from torchchat.builder import build_model
    from torchchat.options import ModelOptions, QuantizeOptions, SourceOptions

    specs = [None, '{"linear:int8": {"groupsize": 0}}']
    if kernels.simd_level() & kernels.INT4:
        specs.append('{"precision": {"dtype": "bf16"}, "linear:int4": {"groupsize": 32}}')
    for spec in specs:
        built = build_model(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES_BIN),
                quantization=QuantizeOptions(recipe=spec),
            )
        )
        assert built.runtime.fused_decode
        tokens = []
        for fused in (True, False):
            built.runtime.fuse_decode(fused)
            tokens.append(greedy(built, "Once upon a time", 200)[1].tokens)
        assert tokens[0] == tokens[1] and len(tokens[0]) == 200, spec


@pytest.mark.slow
def test_two_compiled_runtimes_keep_their_own_graphs():
    """Two models of one shape but other weights compiled in one process (a draft and its
    target): each decodes as its own modules do, not through the other's graph."""
    specs = [None, '{"linear:int8": {"groupsize": 0}}']
    runtimes = [
        EagerRuntime(fused_model(s, torch.bfloat16), 40, compile=True, fused_decode=False)
        for s in specs
    ]
    for rt in runtimes:
        rt.prefill(torch.tensor([[1, 2, 3]]), 0)
        got = rt.decode(torch.tensor([[4]]), 3)
        rt.model.setup_caches(1, 40)
        with torch.inference_mode():
            rt.model(torch.tensor([[1, 2, 3]]), torch.arange(3))
            ref = rt.model(torch.tensor([[4]]), torch.tensor([3]))[0, -1]
        assert max_rel(got, ref) < 2e-2


def test_fused_decode_follows_dtype_changes_and_loaded_weights(monkeypatch):
    """The runtime's plan holds references to weights and caches (and a copy of int4 scales):
    after .to(), new caches or load_state_dict it is renewed, so the fused step never runs on
    stale tensors."""
    calls = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: calls.append(1) or real(*a))
    tokens = torch.randint(0, 128, (1, 14), generator=torch.Generator().manual_seed(4))

    def fused_then_modules(runtime):  # the plan as it stands, then the modules on fresh caches
        fused = runtime_prefill_then_decode(runtime, tokens, 10)
        assert len(calls) == 4
        calls.clear()
        runtime.fuse_decode(False)
        runtime.model.setup_caches(1, 40)
        return fused, runtime_prefill_then_decode(runtime, tokens, 10)

    runtime = EagerRuntime(fused_model(None, None), 40)
    assert runtime.fused_decode
    runtime.model.to(torch.bfloat16)
    runtime.model.setup_caches(1, 40)
    fused, modules = fused_then_modules(runtime)
    assert fused.dtype == torch.float32 and max_rel(fused, modules) < 2e-2
    if not kernels.simd_level() & kernels.INT4:
        return
    spec = '{"linear:int4": {"groupsize": 32}}'
    model = fused_model(spec, torch.bfloat16)
    other = Transformer(model.args)
    other.load_state_dict(random_state_dict(model.args, seed=9))
    quantize(other, load_quantize_spec(spec))
    runtime = EagerRuntime(model, 40)
    assert runtime.fused_decode
    model.load_state_dict(other.to(torch.bfloat16).state_dict(), strict=False)
    fused, modules = fused_then_modules(runtime)
    assert max_rel(fused, modules) < 2e-2


@pytest.mark.skipif(not kernels.simd_level() & kernels.INT4, reason="no int4 kernels at this level")
def test_an_fp32_int4_model_keeps_bf16_scales_and_prefills_on_torchchats_kernels(monkeypatch):
    """Scales made in bf16 stay bf16 when the model is cast to fp32, so its prefill runs on
    torchchat's kernels, never aten's (which kept a repacked copy of every weight beside it)."""
    from torchchat.quant.linear import Int4Linear

    model = fused_model('{"linear:int4": {"groupsize": 32}}', torch.float32)
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert int4 and all(m.scales_and_zeros.dtype == torch.bfloat16 for m in int4)
    assert model.norm.weight.dtype == torch.float32
    monkeypatch.setattr(
        Int4Linear, "aten_weight", lambda self: pytest.fail("aten's int4 kernel ran")
    )
    runtime = EagerRuntime(model, 40)
    tokens = torch.randint(0, 128, (1, 18), generator=torch.Generator().manual_seed(3))
    logits = runtime.prefill(tokens, 0)
    assert logits.shape == (128,) and torch.isfinite(logits).all()
    # scales that are not bf16 values (a checkpoint's fp32 ones) stay as they are
    wq = int4[0]
    wq.scales_and_zeros = wq.scales_and_zeros.float()
    wq.scales_and_zeros[0, 0, 0] += 1e-6
    assert wq.to(torch.float32).scales_and_zeros.dtype == torch.float32
