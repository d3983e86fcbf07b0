"""Batched forward (one KV slot per sequence, per-row positions) against the one-sequence path."""

from __future__ import annotations

import pytest
import torch

from tests.support import random_args, random_state_dict
from torchchat.builder import build_transformer
from torchchat.runtime.eager import EagerRuntime

ATOL = 1e-5  # fp32: batched rows go through GEMMs of another M, so may round differently
SLOTS, SEQ = 4, 64


def model_pair():
    """The same random GQA weights twice: one with a single cache row, one with SLOTS rows."""
    args = random_args(n_heads=4, n_kv_heads=2)
    sd = random_state_dict(args, seed=2)
    single = build_transformer(args, sd, torch.float32, "cpu")
    single.setup_caches(1, SEQ)
    batched = build_transformer(args, sd, torch.float32, "cpu")
    batched.setup_caches(SLOTS, SEQ)
    return args, single, batched


def random_tokens(args, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_rows_at_different_positions_and_slots_match_one_sequence():
    args, single, batched = model_pair()
    lengths = [5, 11, 2, 17]  # each sequence's prompt: the rows sit at different positions
    slots = [2, 0, 3, 1]  # and not in slot order
    prompts = [random_tokens(args, n, seed=i) for i, n in enumerate(lengths)]
    steps = [random_tokens(args, 6, seed=10 + i) for i in range(len(lengths))]

    expected = []  # per sequence: logits of its prompt's last token, then of each step
    for prompt, more in zip(prompts, steps, strict=True):
        out = [single(prompt, torch.arange(prompt.shape[1]))[0, -1]]
        # Three steps one token at a time, then three in one call.
        for i in range(3):
            pos = prompt.shape[1] + i
            out.append(single(more[:, i : i + 1], torch.tensor([pos]))[0, -1])
        start = prompt.shape[1] + 3
        out.extend(single(more[:, 3:], torch.arange(start, start + 3))[0])
        expected.append(out)

    got = [[] for _ in lengths]
    for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        got[i].append(batched(prompt, torch.arange(prompt.shape[1]), slot)[0, -1])
    order = sorted(range(len(slots)), key=lambda i: slots[i])  # row r of a step is slot r
    for step in range(3):
        tokens = torch.cat([steps[i][:, step : step + 1] for i in order])
        positions = torch.tensor([[lengths[i] + step] for i in order])
        logits = batched(tokens, positions)
        for row, i in enumerate(order):
            got[i].append(logits[row, -1])
    tokens = torch.cat([steps[i][:, 3:] for i in order])
    positions = torch.stack([torch.arange(lengths[i] + 3, lengths[i] + 6) for i in order])
    logits = batched(tokens, positions)  # (SLOTS, 3): several tokens per row at once
    for row, i in enumerate(order):
        got[i].extend(logits[row])

    for i in range(len(lengths)):
        for e, g in zip(expected[i], got[i], strict=True):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def snapshot(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (a.kv_cache.k.clone(), a.kv_cache.v.clone())
        for a in (layer.attention for layer in model.layers)
    ]


@torch.no_grad()
def test_writing_one_slot_leaves_the_others_alone():
    args, _, batched = model_pair()
    for slot in range(SLOTS):  # every slot holds something
        batched(random_tokens(args, 20, seed=slot), torch.arange(20), slot)
    before = snapshot(batched)
    batched(random_tokens(args, 7, seed=9), torch.arange(3, 10), 1)  # slot 1, positions 3..9
    positions = torch.tensor([[30], [31], [32], [33]])
    batched(torch.ones(SLOTS, 1, dtype=torch.long), positions)  # one position per slot
    for (k0, v0), (k1, v1) in zip(before, snapshot(batched), strict=True):
        for old, new in ((k0, k1), (v0, v1)):
            changed = (old != new).any(dim=(1, 3))  # (slot, position)
            expect = torch.zeros_like(changed)
            expect[1, 3:10] = True
            for slot in range(SLOTS):
                expect[slot, 30 + slot] = True
            assert torch.equal(changed, expect)


def runtime_with_prompt_in_every_slot(compile: bool = False):
    args = random_args(n_heads=4, n_kv_heads=2, max_seq_len=256)
    model = build_transformer(args, random_state_dict(args, seed=4), torch.float32, "cpu")
    rt = EagerRuntime(model, 256, compile=compile)
    rt.setup_batch(SLOTS)
    prompt = random_tokens(args, 9, seed=1)
    rt.prefill_slot(prompt, 0, 0)
    for slot in range(1, SLOTS):
        rt.copy_slot(0, slot, 9)
    return args, rt


def decode_each_slot_in_a_crowd(args, rt) -> list[torch.Tensor]:
    """Row `slot`'s logits for token 7 at position 9, while the other rows feed other tokens
    far along (so the step attends to more of the cache)."""
    out = []
    for slot in range(SLOTS):
        tokens = torch.randint(0, args.vocab_size, (SLOTS, 1), generator=torch.Generator())
        positions = torch.tensor([200, 150, 100, 250])
        tokens[slot], positions[slot] = 7, 9
        out.append(rt.decode_batch(tokens, positions)[slot])
    return out


@torch.no_grad()
def test_decode_batch_row_is_the_same_whatever_the_other_rows_do():
    """The server's exactness rests on this: a row's logits are bit-identical alone (the other
    rows idle) or in a crowd, in any slot (same shapes every step, so the same kernels)."""
    args, rt = runtime_with_prompt_in_every_slot()
    tokens = torch.tensor([[7], [0], [0], [0]])
    alone = rt.decode_batch(tokens, torch.tensor([9, -1, -1, -1]))[0]
    for got in decode_each_slot_in_a_crowd(args, rt):
        assert torch.equal(got, alone)
    with pytest.raises(ValueError):
        rt.decode_batch(tokens[:2], torch.tensor([0, 0]))


@torch.no_grad()
def test_compiled_decode_batch_matches_eager():
    args, eager = runtime_with_prompt_in_every_slot()
    _, compiled = runtime_with_prompt_in_every_slot(compile=True)
    tokens = torch.tensor([[7], [0], [0], [0]])
    positions = torch.tensor([9, -1, -1, -1])
    alone = compiled.decode_batch(tokens, positions)[0]
    torch.testing.assert_close(alone, eager.decode_batch(tokens, positions)[0], atol=ATOL, rtol=0)
    for got in decode_each_slot_in_a_crowd(args, compiled):
        assert torch.equal(got, alone)
