"""--gguf-packed: Q4_0/Q8_0 linears keep the file's codes and run on the int4/int8 kernels."""

from __future__ import annotations

import pytest
import torch

from tests.gguf.gguf_files import QUANTS
from torchchat.builder import build_model, model_from_checkpoint
from torchchat.errors import TorchchatError
from torchchat.options import ModelOptions, QuantizeOptions, SourceOptions
from torchchat.quant.linear import Int4Linear, Int8Linear


@pytest.mark.parametrize("kind,module", [("Q4_0", Int4Linear), ("Q8_0", Int8Linear)])
def test_packed_linears_hold_the_files_codes(kind, module):
    packed, _, _ = model_from_checkpoint(
        ModelOptions(
            source=SourceOptions(gguf_path=QUANTS / f"tiny-random-{kind}.gguf"),
            quantization=QuantizeOptions(gguf_packed=True),
        )
    )
    ref, _, _ = model_from_checkpoint(
        ModelOptions(SourceOptions(gguf_path=QUANTS / f"tiny-random-{kind}-F32.gguf"))
    )
    wq = packed.layers[0].attention.wq
    assert isinstance(wq, module)
    for name, m in packed.named_modules():
        if isinstance(m, Int4Linear | Int8Linear):
            w_ref = ref.get_submodule(name).weight.float()
            # ggml's fp16 block scales are kept in bf16: at most 2^-8 relative error per scale,
            # times the largest code magnitude (8 for Q4_0, 128 for Q8_0).
            group_max = w_ref.reshape(w_ref.shape[0], -1, 32).abs().amax(-1, keepdim=True)
            bound = (group_max * 2**-7).expand(-1, -1, 32).reshape(w_ref.shape) + 1e-7
            assert ((m.dequantize() - w_ref).abs() <= bound).all(), name


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_packed_logits_close_to_dequantized(kind):
    packed = build_model(
        ModelOptions(
            source=SourceOptions(gguf_path=QUANTS / f"tiny-random-{kind}.gguf"),
            quantization=QuantizeOptions(gguf_packed=True),
        )
    )
    plain = build_model(
        ModelOptions(SourceOptions(gguf_path=QUANTS / f"tiny-random-{kind}-F32.gguf"))
    )
    tokens = torch.tensor([[1, 400, 57, 312, 99, 7]])
    a, b = packed.runtime.forward(tokens, 0), plain.runtime.forward(tokens, 0)
    # bf16 activations in the low-bit kernels: logits agree to ~1% of their spread.
    assert (a - b).abs().max() < 0.02 * (b.max() - b.min())


def test_packed_is_refused_where_it_cannot_apply(tmp_path):
    from tests.support import STORIES_BIN

    with pytest.raises(TorchchatError, match="GGUF files only"):
        model_from_checkpoint(
            ModelOptions(
                source=SourceOptions(checkpoint_path=STORIES_BIN),
                quantization=QuantizeOptions(gguf_packed=True),
            )
        )
    with pytest.raises(TorchchatError, match="drop --quantize"):
        model_from_checkpoint(
            ModelOptions(
                source=SourceOptions(gguf_path=QUANTS / "tiny-random-Q4_0.gguf"),
                quantization=QuantizeOptions(gguf_packed=True, recipe='{"linear:int8": {}}'),
            )
        )
