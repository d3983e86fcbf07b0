"""Greedy generation reproduces reference outputs exactly; sampling and stop rules behave."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import (
    STORIES_BIN,
    STORIES_TOK,
    greedy,
    random_args,
    random_state_dict,
    shared_path,
)
from torchchat.builder import build_model, build_transformer
from torchchat.generate.generator import Generator, Result, _split_stop
from torchchat.generate.sampling import sample
from torchchat.options import (
    ExecutionOptions,
    ModelOptions,
    SamplingOptions,
    SourceOptions,
    SpeculationOptions,
)
from torchchat.runtime.eager import EagerRuntime
from torchchat.tokenizer import load_tokenizer

GREEDY = SamplingOptions(temperature=0)

# llama2.c test_all.py: run.c on stories260K.bin, -t 0.0 -n 200, stdout without its final "\n".
LLAMA2C_STORIES260K = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    'She said, "I want to play with your ball, but I can\'t find it."\n'
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she"
)


@pytest.fixture(scope="module")
def stories():
    return build_model(
        ModelOptions(
            source=SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK),
            execution=ExecutionOptions(dtype="fp32"),
        )
    )


def test_stories260k_matches_llama2c(stories):
    text, res = greedy(stories, "", 200)
    assert text == LLAMA2C_STORIES260K
    assert len(res.tokens) == 200 and res.finish_reason == "length"


def test_tiny_random_hf_expected_greedy():
    ref = json.loads(
        shared_path("models", "tiny-random-llama-hf", "expected_greedy.json").read_text()
    )
    built = build_model(
        ModelOptions(
            SourceOptions(
                checkpoint_path=shared_path("models", "tiny-random-llama-hf"),
                tokenizer_path=shared_path("models", "llama2c-tokenizer", "tokenizer.model"),
            )
        )
    )
    res = Result()
    list(Generator(built.runtime, built.tokenizer).stream(
        ref["prompt_token_ids"], max_new_tokens=ref["max_new_tokens"], sampling=GREEDY, result=res
    ))  # fmt: skip
    assert res.tokens == ref["expected_generated_ids"]


def test_compiled_decode_gives_identical_greedy_tokens(stories):
    compiled = build_model(
        ModelOptions(
            source=SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK),
            execution=ExecutionOptions(compile=True, compile_prefill=True, fused_decode=False),
        )
    )
    _, eager = greedy(stories, "Once upon a time", 120)
    _, comp = greedy(compiled, "Once upon a time", 120)
    assert comp.tokens == eager.tokens


def test_stop_string_is_cut_and_never_leaks(stories):
    gen = Generator(stories.runtime, stories.tokenizer)
    res = Result()
    prompt = stories.tokenizer.encode("", bos=True)
    pieces = list(
        gen.stream(prompt, max_new_tokens=200, sampling=GREEDY, stop_strings=["Lily."], result=res)
    )
    assert "".join(pieces) == "Once upon a time, there was a little girl named "
    assert res.finish_reason == "stop"


def test_split_stop_holds_back_partial_matches():
    assert _split_stop("abc <|e", ["<|end|>"]) == ("abc ", "<|e", False)
    assert _split_stop("abc <|end|> more", ["<|end|>"]) == ("abc ", "", True)
    assert _split_stop("abc <|e", ["<|end|>"], final=True) == ("abc <|e", "", False)


def test_prompt_longer_than_context_is_a_clean_error(stories):
    from torchchat.errors import TorchchatError

    gen = Generator(stories.runtime, stories.tokenizer)
    with pytest.raises(TorchchatError, match="does not fit the context of 512"):
        list(gen.stream([1] * 600, max_new_tokens=5, sampling=GREEDY))


def test_generation_stops_at_context_end(stories):
    gen = Generator(stories.runtime, stories.tokenizer)
    res = Result()
    list(gen.stream([1] * 500, max_new_tokens=100, sampling=GREEDY, result=res))
    assert len(res.tokens) + 500 <= 513 and res.fed_until <= 512


def test_seeded_sampling_is_reproducible_and_private():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    opts = SamplingOptions(temperature=1.0, top_k=10, top_p=0.9, seed=7)
    from torchchat.generate.sampling import make_generator

    a = [sample(logits, opts, g) for g in [make_generator(7)] for _ in range(20)]
    torch.manual_seed(123)  # global RNG must not matter
    b = [sample(logits, opts, g) for g in [make_generator(7)] for _ in range(20)]
    assert a == b
    allowed = set(torch.topk(logits, 10).indices.tolist())
    assert set(a) <= allowed


def test_draws_follow_the_probabilities_and_never_pick_zero_ones():
    from torchchat.generate.sampling import draw, make_generator

    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    g = make_generator(3)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(20000)]), minlength=5)
    assert counts[1] == counts[4] == 0  # zero probability, also the last entry
    # each frequency within 4 standard deviations of its probability (seeded: not flaky)
    sd = (probs * (1 - probs) / 20000).sqrt()
    assert ((counts / 20000 - probs).abs() <= 4 * sd + 1e-12).all()
    assert draw(torch.tensor([0.0, 0.0, 2.0]), g) == 2  # unnormalized weights
    with pytest.raises(ValueError, match="sum to nan"):
        draw(torch.tensor([0.5, float("nan")]), g)


def test_top_p_keeps_smallest_nucleus():
    probs_logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    opts = SamplingOptions(temperature=1.0, top_k=None, top_p=0.7)
    from torchchat.generate.sampling import make_generator

    g = make_generator(0)
    seen = {sample(probs_logits, opts, g) for _ in range(300)}
    assert seen == {0, 1}


def test_kv_cache_reuse_equals_full_prefill():
    """Continuing at start_pos gives the same tokens as feeding the whole sequence again."""
    args = random_args()
    sd = random_state_dict(args, seed=2)
    tok = load_tokenizer(STORIES_TOK)  # any tokenizer with vocab <= 96 ids used is fine here
    rt1 = EagerRuntime(build_transformer(args, sd, torch.float32, "cpu"), 64)
    rt2 = EagerRuntime(build_transformer(args, sd, torch.float32, "cpu"), 64)
    first = [5, 6, 7, 8]
    r1 = Result()
    list(Generator(rt1, tok).stream(first, max_new_tokens=6, sampling=GREEDY, result=r1))
    cont = [r1.pending, 9, 10]
    r2 = Result()
    list(
        Generator(rt1, tok).stream(
            cont, start_pos=r1.fed_until, max_new_tokens=6, sampling=GREEDY, result=r2
        )
    )
    r3 = Result()
    full = first + r1.tokens + [9, 10]
    list(Generator(rt2, tok).stream(full, max_new_tokens=6, sampling=GREEDY, result=r3))
    assert r2.tokens == r3.tokens


def test_prefix_cache_skips_shared_prompt_and_keeps_results(stories):
    gen = Generator(stories.runtime, stories.tokenizer)
    stories.runtime.cached = []  # forget what earlier tests left in the shared model's cache
    tok = stories.tokenizer
    first = tok.encode("Once upon a time there was a little dog", bos=True)
    r1 = Result()
    list(gen.stream_reusing_prefix(first, max_new_tokens=10, sampling=GREEDY, result=r1))
    assert r1.metrics.cached_tokens == 0 and r1.metrics.prompt_tokens == len(first)
    second = tok.encode("Once upon a time there was a big cat", bos=True)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    r2 = Result()
    list(gen.stream_reusing_prefix(second, max_new_tokens=10, sampling=GREEDY, result=r2))
    assert r2.metrics.cached_tokens == shared and r2.metrics.prompt_tokens == len(second) - shared
    fresh = Result()
    list(
        Generator(stories.runtime, tok).stream(
            second, max_new_tokens=10, sampling=GREEDY, result=fresh
        )
    )
    assert r2.tokens == fresh.tokens
    r3 = Result()  # the same prompt again: only its last token is fed
    list(gen.stream_reusing_prefix(second, max_new_tokens=10, sampling=GREEDY, result=r3))
    assert r3.metrics.prompt_tokens == 1 and r3.tokens == fresh.tokens


def test_speculative_greedy_equals_plain_greedy(stories):
    from torchchat.builder import build_speculator

    opts = ModelOptions(
        source=SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK),
        speculation=SpeculationOptions(
            draft_quantize='{"linear:int4": {"groupsize": 32}}', speculate_k=4
        ),
    )
    spec = build_speculator(opts, stories.runtime, verbose=False)
    plain, fast = Result(), Result()
    prompt = stories.tokenizer.encode("Once upon a time", bos=True)
    list(
        Generator(stories.runtime, stories.tokenizer).stream(
            prompt, max_new_tokens=150, sampling=GREEDY, result=plain
        )
    )
    text = "".join(
        Generator(stories.runtime, stories.tokenizer, spec).stream(
            prompt, max_new_tokens=150, sampling=GREEDY, result=fast
        )
    )
    assert fast.tokens == plain.tokens and text == plain.text
    m = fast.metrics
    assert m.draft_proposed > 0 and 0 < m.draft_accepted <= m.draft_proposed
    # A continuation at start_pos (chat) keeps target and draft caches consistent.
    more = [fast.pending, *stories.tokenizer.encode(" The end.")]
    a, b = Result(), Result()
    list(
        Generator(stories.runtime, stories.tokenizer, spec).stream(
            more, start_pos=fast.fed_until, max_new_tokens=40, sampling=GREEDY, result=a
        )
    )
    full = prompt + fast.tokens + more[1:]
    list(
        Generator(stories.runtime, stories.tokenizer).stream(
            full, max_new_tokens=40, sampling=GREEDY, result=b
        )
    )
    assert a.tokens == b.tokens


def test_speculative_sampling_keeps_target_distribution():
    """With a deliberately bad draft, rejection sampling still reproduces the target's next-token
    distribution (checked on the first generated token over many seeds)."""
    from torchchat.generate.speculative import Speculator

    args = random_args(vocab_size=8, dim=16, n_heads=2, n_kv_heads=1, hidden_dim=24, max_seq_len=16)
    target = EagerRuntime(
        build_transformer(args, random_state_dict(args, seed=1), torch.float32, "cpu"), 16
    )
    draft = EagerRuntime(
        build_transformer(args, random_state_dict(args, seed=9), torch.float32, "cpu"), 16
    )
    opts = SamplingOptions(temperature=1.0, top_k=None)
    prompt = [1, 2, 3]
    with torch.no_grad():
        logits = target.forward(torch.tensor([prompt + [0]]), 0)[0]
    # Distribution of the SECOND generated token given the first is 0 is what speculation samples.
    p = torch.softmax(logits[-1], -1)
    with torch.no_grad():
        q = torch.softmax(draft.forward(torch.tensor([prompt + [0]]), 0)[0, -1], -1)
    assert (p - q).abs().max() > 0.15  # the draft alone would fail this test
    spec = Speculator(target, draft, k=2)
    counts = torch.zeros(8)
    n = 1500
    from torchchat.generate.sampling import make_generator

    for seed in range(n):
        spec.prefill(prompt, 0)
        target.prefill(torch.tensor([prompt]), 0)
        out = spec.step(0, 3, opts, make_generator(seed))
        counts[out[0]] += 1
    freq = counts / n
    assert (freq - p).abs().max() < 0.04, (freq, p)  # ~3 sigma at n=1500; seeds are fixed


@pytest.mark.parametrize("temperature", [1e-310, 1e-30, 1e-6])
def test_tiny_temperature_is_a_distribution_on_the_argmax(temperature):
    from torchchat.generate.sampling import probabilities

    logits = torch.tensor([1.0, 3.0, 2.5, -4.0])
    probs = probabilities(
        logits, SamplingOptions(temperature=temperature, top_k=None, top_p=1e-310)
    )
    assert torch.equal(probs, torch.tensor([0.0, 1.0, 0.0, 0.0]))
