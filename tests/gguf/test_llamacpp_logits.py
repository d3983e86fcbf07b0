"""The packed GGUF path against llama.cpp's own CPU logits on the same files and tokens
(recorded once by bench/record_llamacpp_logits.py with llama-cpp-python 0.3.36 on x86 with
AVX-512: llamacpp_logits.npz beside this file, every position of 12 fixed tokens, as one batch and
one token at a time).

Decode quantizes activations per block as ggml's x86 code does and sums the same integer
products: for most files its logits equal llama.cpp's one-token logits to float rounding. For
Q4_0, Q5_0, Q5_1, Q2_K and Q3_K_M they differ by up to 1.5% of the logits' spread (from the
third position for Q4_0/Q5_0, at one position for Q5_1/Q2_K, Q3_K_M's Q5_K attn_v from the
first); llama.cpp's own batch and one-token logits differ by up to 0.8% (Q4_K_M). Prefill
multiplies float activations by the exact weights, where llama.cpp quantizes them: within 2% of
the spread. Greedy tokens agree wherever llama.cpp's top-2 margin exceeds the bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.gguf.gguf_files import QUANTS
from tests.kernels.test_fused_decode import runtime_prefill_then_decode
from torchchat import kernels
from torchchat.builder import build_model
from torchchat.options import ModelOptions, SourceOptions

RECORDED = np.load(Path(__file__).with_name("llamacpp_logits.npz"))
TOKENS = torch.tensor([RECORDED["tokens"].tolist()])
EXACT = ["Q8_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K"]
CLOSE = ["Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M"]
DECODE_BOUND = {**dict.fromkeys(EXACT, 1e-6), **dict.fromkeys(CLOSE, 0.02)}  # x spread
PREFILL_BOUND = 0.025

pytestmark = pytest.mark.skipif(
    not kernels.available(kernels.GGML), reason="torchchat's CPU kernels are off on this machine"
)


def _model(name: str):
    return build_model(ModelOptions(SourceOptions(gguf_path=QUANTS / f"tiny-random-{name}.gguf")))


def _check(ours: np.ndarray, ref: np.ndarray, bound: float) -> None:
    spread = np.ptp(ref, axis=-1).max()
    assert np.abs(ours - ref).max() <= bound * spread
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * bound * spread
    assert (ours.argmax(-1) == ref.argmax(-1))[decided].all()


@pytest.mark.parametrize("name", EXACT + CLOSE)
def test_decode_logits_equal_llamacpps(name):
    built = _model(name)
    assert built.runtime.fused_decode
    ours = runtime_prefill_then_decode(built.runtime, TOKENS, 1).reshape(len(TOKENS[0]), -1)
    _check(ours.numpy(), RECORDED[f"{name}_decode"], DECODE_BOUND[name])


@pytest.mark.parametrize("name", EXACT + CLOSE)
def test_prefill_logits_close_to_llamacpps(name):
    ours = _model(name).runtime.forward(TOKENS, 0)[0]
    _check(ours.numpy(), RECORDED[name], PREFILL_BOUND)
