"""The Transformer against Hugging Face's LlamaForCausalLM on the same random weights."""

from __future__ import annotations

import pytest
import torch

from tests.formats import native_to_hf
from tests.support import random_args, random_state_dict
from torchchat.builder import build_transformer
from torchchat.model.config import RopeScaling

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "llama31_rope_scaling": dict(
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "tied_embeddings": dict(tie_embeddings=True),
    "attention_bias": dict(attention_bias=True),
}


def hf_model(args, sd):
    from tests.formats import hf_config

    cfg = transformers.LlamaConfig(
        **{k: v for k, v in hf_config(args).items() if k not in ("architectures", "torch_dtype")}
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(native_to_hf(sd, args), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    args = random_args(**VARIANTS[variant])
    sd = random_state_dict(args, seed=1)
    ours = build_transformer(args, sd, torch.float32, "cpu")
    ours.setup_caches(1, args.max_seq_len)
    theirs = hf_model(args, sd)
    tokens = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(tokens).logits
        got = ours(tokens, torch.arange(40))
    assert (got - expected).abs().max().item() < 1e-4


def test_incremental_decode_equals_parallel_prefill():
    """Prefill + one-token decode steps reproduce the full-sequence logits (KV cache correct)."""
    args = random_args()
    model = build_transformer(args, random_state_dict(args), torch.float32, "cpu")
    model.setup_caches(1, args.max_seq_len)
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens, torch.arange(12))
        part = [model(tokens[:, :5], torch.arange(5))]
        for i in range(5, 12):
            part.append(model(tokens[:, i : i + 1], torch.tensor([i])))
    assert torch.allclose(torch.cat(part, dim=1), full, atol=1e-5)
