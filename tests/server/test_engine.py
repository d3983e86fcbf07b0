"""The engine on its own (no HTTP): event order, cancellation, shutdown, logprob alignment."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from tests.server.conftest import SlowRuntime, build_stories
from tests.support import drain
from torchchat.generate.generator import Generator, Result
from torchchat.options import SamplingOptions
from torchchat.server.engine import GONE, SHUTDOWN, Choice, End, Engine, Finish, Job, Piece

GREEDY = SamplingOptions(temperature=0)


@pytest.fixture(scope="module")
def built():
    return build_stories()


def test_events_pieces_then_finish_then_end(built):
    engine = Engine(built.runtime, built.tokenizer, block_size=2)
    prompt = built.tokenizer.encode("Once upon a time", bos=True)

    async def run():
        job = Job([Choice(0, prompt, 20, GREEDY), Choice(1, prompt, 5, GREEDY, False)])
        engine.submit(job)
        return await drain(job)

    try:
        events = asyncio.run(run())
    finally:
        engine.close()
    assert isinstance(events[-1], End)
    # The choices run side by side: the shorter one finishes first.
    finishes = sorted((e for e in events if isinstance(e, Finish)), key=lambda f: f.index)
    assert [(f.index, f.completion_tokens, f.finish_reason) for f in finishes] == [
        (0, 20, "length"),
        (1, 5, "length"),
    ]
    text0 = "".join(e.text for e in events if isinstance(e, Piece) and e.index == 0)
    built.runtime.cached = []
    expected = "".join(
        Generator(built.runtime, built.tokenizer).stream(prompt, max_new_tokens=20, sampling=GREEDY)
    )
    assert text0 == expected
    # The second choice shares the prompt's full blocks (2 tokens each) but the last token's.
    assert len(prompt) == 5 and finishes[1].cached_tokens == 4


def test_logprobs_align_with_tokens(built):
    engine = Engine(built.runtime, built.tokenizer)
    prompt = built.tokenizer.encode("Once upon a time", bos=True)

    async def run():
        job = Job([Choice(0, prompt, 12, SamplingOptions(0.9, seed=3))], top_logprobs=4)
        engine.submit(job)
        return await drain(job)

    try:
        events = asyncio.run(run())
    finally:
        engine.close()
    entries = [lp for e in events if isinstance(e, Piece | Finish) for lp in e.logprobs]
    # Recompute: the same seed gives the same tokens; score them with the model directly.
    built.runtime.cached = []
    res = Result()
    steps = []
    gen = Generator(built.runtime, built.tokenizer)
    list(
        gen.stream(
            prompt,
            max_new_tokens=12,
            sampling=SamplingOptions(0.9, seed=3),
            result=res,
            on_logits=lambda x: steps.append(torch.log_softmax(x.float(), -1)),
        )
    )
    assert [e.token for e in entries] == res.tokens
    for entry, lp in zip(entries, steps, strict=False):
        assert math.isclose(entry.logprob, float(lp[entry.token]), abs_tol=1e-5)
        assert len(entry.top) == 4 and entry.top[0][1] >= entry.top[-1][1]


def test_cancelled_before_start_and_shutdown(built):
    slow = SlowRuntime(built.runtime, 0.01)
    engine = Engine(slow, built.tokenizer, max_queue=4)
    prompt = built.tokenizer.encode("Once", bos=True)

    async def run():
        running = Job([Choice(0, prompt, 400, GREEDY)])
        left = Job([Choice(0, prompt, 400, GREEDY)])
        waiting = Job([Choice(0, prompt, 400, GREEDY)])
        for job in (running, left, waiting):
            engine.submit(job)
        left.cancelled.set()
        await running.next_event()  # generation is under way
        await asyncio.sleep(0.05)
        engine.close()
        return await drain(running), await drain(left), await drain(waiting)

    running, left, waiting = asyncio.run(run())
    assert running[-1] == SHUTDOWN and len(running) < 100
    assert left[-1] in (GONE, SHUTDOWN) and waiting[-1] == SHUTDOWN
