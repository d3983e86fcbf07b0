"""Continuous batching in the engine: choices decoded together give exactly what each gives
alone, a cancelled choice leaves the batch within one step, prompts share cached KV blocks, a
long prompt is prefilled in chunks between the others' decode steps, a full KV pool preempts,
a full queue still answers 503, and a burst fills free seats before the queue."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest

from tests.server.conftest import (
    MODEL_ID,
    SlowBatchRuntime,
    SlowRuntime,
    build_stories,
    live_server,
)
from tests.support import drain, wait_for
from torchchat.cli import build_parser
from torchchat.errors import TorchchatError
from torchchat.options import SamplingOptions
from torchchat.server.config import ServerOptions
from torchchat.server.engine import GONE, Choice, End, Engine, Finish, Job, Piece

GREEDY = SamplingOptions(temperature=0)


@pytest.fixture(scope="module")
def built():
    return build_stories()


def run_jobs(engine: Engine, make_jobs: Callable[[], list[Job]]) -> list[list]:
    """Submit the jobs together; every job's events before its End (none may fail)."""

    async def run() -> list[list]:
        jobs = make_jobs()  # jobs belong to the running event loop
        for job in jobs:
            engine.submit(job)
        return await asyncio.gather(*(drain(job) for job in jobs))

    runs = asyncio.run(run())
    for events in runs:
        assert isinstance(events[-1], End), events[-1]
    return [events[:-1] for events in runs]


def outcome(events: list) -> dict[int, tuple]:
    """Per choice: text, finish reason, token count, and each token's id and logprob."""
    text: dict[int, str] = {}
    logprobs: dict[int, list] = {}
    out = {}
    for e in events:
        if isinstance(e, Piece | Finish):
            logprobs.setdefault(e.index, []).extend((lp.token, lp.logprob) for lp in e.logprobs)
        if isinstance(e, Piece):
            text[e.index] = text.get(e.index, "") + e.text
        elif isinstance(e, Finish):
            out[e.index] = (text.get(e.index, ""), e.finish_reason, e.completion_tokens)
    return {i: (*out[i], logprobs.get(i, [])) for i in out}


# (prompt, max_tokens, stop strings, sampling, choices, top_logprobs): lengths, budgets, stop
# strings, seeds and sampling options all differ, and there are more choices than slots.
SPECS = [
    ("Once upon a time", 40, (), GREEDY, 1, None),
    ("The little dog", 7, (), SamplingOptions(0.9, seed=1), 1, None),
    ("Lily and Ben went to the park.", 30, (".",), GREEDY, 1, None),
    ("Tom had a red ball", 25, ("ball", "the"), SamplingOptions(1.0, top_k=20, seed=5), 1, 2),
    ("One day", 50, (), SamplingOptions(0.7, top_p=0.9, seed=9), 2, None),
    ("Once upon a time there was", 12, (), GREEDY, 1, 3),
    ("A cat", 1, (), GREEDY, 1, None),
    ("The sun was hot", 35, ("sun",), SamplingOptions(0.8, seed=2), 1, None),
]


def make_job(tokenizer, spec) -> Job:
    text, max_tokens, stop, sampling, n, top = spec
    prompt = tokenizer.encode(text, bos=True)
    choices = []
    for i in range(n):  # choice i of a seeded request uses seed + i, as the server does
        seeded = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i)
        choices.append(Choice(i, prompt, max_tokens, seeded))
    return Job(choices, stop, top)


def test_together_equals_alone(built):
    tok = built.tokenizer
    # Small blocks and chunks: prompts share blocks, and are prefilled between decode steps.
    engine = Engine(built.runtime, tok, max_queue=16, max_batch=4, block_size=4, prefill_chunk=3)
    try:
        assert engine.batched and engine.max_batch == 4
        alone = [outcome(run_jobs(engine, lambda s=s: [make_job(tok, s)])[0]) for s in SPECS]
        steps, rows = engine.stats.decode_steps, engine.stats.decode_rows
        together = run_jobs(engine, lambda: [make_job(tok, s) for s in SPECS])
        steps, rows = engine.stats.decode_steps - steps, engine.stats.decode_rows - rows
    finally:
        engine.close()
    assert rows / steps > 2  # the choices really were decoded side by side
    for spec, expected, events in zip(SPECS, alone, together, strict=True):
        got = outcome(events)
        assert got.keys() == expected.keys() == set(range(spec[4]))
        for i in got:
            text, reason, count, lps = got[i]
            e_text, e_reason, e_count, e_lps = expected[i]
            assert (text, reason, count) == (e_text, e_reason, e_count), spec
            assert [t for t, _ in lps] == [t for t, _ in e_lps]
            # Prefills may reuse a different amount of cached prompt alone and together.
            assert [v for _, v in lps] == pytest.approx([v for _, v in e_lps], abs=1e-5)
    reasons = {o[1] for e in together for o in outcome(e).values()}
    assert reasons == {"stop", "length"}  # stop strings were hit, budgets too


def first_tokens(events: list) -> list[int]:
    """The generated token ids of choice 0 (from its logprobs)."""
    return [lp.token for e in events if isinstance(e, Piece | Finish) for lp in e.logprobs]


def test_prompts_share_cached_blocks(built):
    tok = built.tokenizer
    first = tok.encode("Once upon a time there was a little girl", bos=True)
    second = tok.encode("The big brown dog ran to the park", bos=True)
    engine = Engine(built.runtime, tok, max_batch=2, block_size=4)

    def blocks(n: int) -> int:  # tokens in the full 4-token blocks of n tokens
        return n // 4 * 4

    def cached(*prompts: list[int]) -> list[int]:
        jobs = run_jobs(engine, lambda: [Job([Choice(0, p, 3, GREEDY)]) for p in prompts])
        return [next(e.cached_tokens for e in events if isinstance(e, Finish)) for events in jobs]

    try:
        assert cached(first) == [0]  # a fresh engine holds nothing
        # Just BOS in common: no full block, but first's cached first block begins with it, so
        # it is copied (copy-on-write at the first differing block).
        assert cached(second) == [1]
        # Each prompt's blocks stay cached after it ends (the block with its last prompt tokens
        # filled up while it decoded: copied from); the last token is always fed again.
        assert cached(first) == [len(first) - 1]
        assert cached(second) == [len(second) - 1]
        assert cached(first, second) == [len(first) - 1, len(second) - 1]
        # Two choices of one new prompt: the second waits for the first's blocks, then shares them.
        third = tok.encode("Ben liked to play", bos=True)
        jobs = run_jobs(
            engine, lambda: [Job([Choice(0, third, 3, GREEDY), Choice(1, third, 3, GREEDY)])]
        )
        finishes = sorted((e for e in jobs[0] if isinstance(e, Finish)), key=lambda f: f.index)
        # (the first copies BOS, the one token third has in common with the cached prompts)
        assert [f.cached_tokens for f in finishes] == [1, blocks(len(third) - 1)]
        # A chat's next turn: the earlier turn's prompt and reply (blocks filled while decoding).
        [events] = run_jobs(engine, lambda: [Job([Choice(0, second, 12, GREEDY)], (), 0)])
        reply = first_tokens(events)
        turn = [*second, *reply, *tok.encode("and then", bos=False)]
        assert cached(turn) == [blocks(len(second) + len(reply) - 1)]  # the last was never fed
    finally:
        engine.close()


def test_a_long_prompt_is_prefilled_between_decode_steps(built):
    """While two choices decode, a long prompt arrives: every step still advances both, and
    takes at most `prefill_chunk` tokens of the prompt."""
    tok = built.tokenizer
    slow = SlowBatchRuntime(built.runtime, 0.01)
    engine = Engine(slow, tok, max_batch=4, prefill_chunk=5)
    long_prompt = tok.encode(" ".join(["Once upon a time there was a cat."] * 8), bos=True)

    async def run() -> None:
        runners = [Job([Choice(0, tok.encode(p, bos=True), 80, GREEDY)]) for p in ("A", "The")]
        for job in runners:
            engine.submit(job)
        for job in runners:
            for _ in range(3):  # both are decoding
                assert isinstance(await job.next_event(), Piece)
        late = Job([Choice(0, long_prompt, 2, GREEDY)])
        engine.submit(late)
        await asyncio.gather(*(drain(job) for job in [*runners, late]))

    try:
        asyncio.run(run())
        ids = {d.seq.id for d in engine._decoding.values()}
    finally:
        engine.close()
    assert not ids
    late = max(seq for fed in slow.fed for seq in fed)  # the last sequence started
    chunks = [fed for fed in slow.fed if late in fed][:-1]  # then one decode step (2 tokens)
    assert sum(fed[late] for fed in chunks) == len(long_prompt)
    for fed in chunks:  # the two others decode in every step of the prompt's prefill
        assert len(fed) == 3 and fed[late] <= 5 and sorted(fed.values())[:2] == [1, 1]
    assert engine.stats.prefill_tokens >= len(long_prompt)


def test_a_full_kv_pool_preempts_the_newest_and_everyone_finishes(built):
    """Room for 48 positions (12 blocks of 4): three choices growing to ~40 each cannot all stay;
    the newest gives its blocks back and is recomputed later, and every choice completes."""
    tok = built.tokenizer
    engine = Engine(built.runtime, tok, max_batch=3, kv_blocks=12, block_size=4)
    specs = [(p, 34, (), GREEDY, 1, None) for p in ("Once upon a time", "The dog", "Lily")]
    try:
        together = run_jobs(engine, lambda: [make_job(tok, s) for s in specs])
        assert engine.stats.preempted > 0
        alone = [run_jobs(engine, lambda s=s: [make_job(tok, s)])[0] for s in specs]
    finally:
        engine.close()
    for got, expected in zip(together, alone, strict=True):
        assert outcome(got) == outcome(expected)
        assert outcome(got)[0][1:3] == ("length", 34)


def test_a_choice_larger_than_the_pool(built):
    """A prompt longer than the whole pool is refused; a choice that grows past it alone ends
    with finish_reason length."""
    tok = built.tokenizer
    engine = Engine(built.runtime, tok, max_batch=2, kv_blocks=4, block_size=4)
    prompt = tok.encode("Once upon a time", bos=True)
    try:
        [events] = run_jobs(engine, lambda: [Job([Choice(0, prompt, 40, GREEDY)])])
        finish = next(e for e in events if isinstance(e, Finish))
        # 16 positions hold the prompt and all generated tokens but the last (never fed).
        assert (finish.finish_reason, finish.completion_tokens) == ("length", 16 - len(prompt) + 1)

        async def too_long() -> list:
            job = Job([Choice(0, list(range(1, 20)), 4, GREEDY)])
            engine.submit(job)
            return await drain(job)

        [failed] = asyncio.run(too_long())
    finally:
        engine.close()
    assert failed.status == 400 and "does not fit the KV cache of 16 positions" in failed.message


def test_cancelled_choice_leaves_the_batch_within_one_step(built):
    tok = built.tokenizer
    slow = SlowBatchRuntime(built.runtime, 0.02)
    engine = Engine(slow, tok, max_batch=3)
    prompt = tok.encode("Once upon a time", bos=True)

    async def run() -> tuple[float, int, list]:
        stay = Job([Choice(0, prompt, 300, GREEDY)])
        leave = Job([Choice(0, tok.encode("The dog", bos=True), 300, GREEDY)])
        engine.submit(stay)
        engine.submit(leave)
        for _ in range(5):  # both are decoding
            assert isinstance(await leave.next_event(), Piece)
        slot = next(d.seq.id for d in engine._decoding.values() if d.job is leave)
        at = time.monotonic()
        leave.cancelled.set()
        while (last := await leave.next_event()) is not GONE:
            assert isinstance(last, Piece)
        # The freed seat serves a new request while the first one goes on.
        late = Job([Choice(0, prompt, 5, GREEDY)])
        engine.submit(late)
        late_events = []
        while not isinstance(event := await late.next_event(), End):
            late_events.append(event)
        assert engine.running == 1  # `stay` is still generating
        stay.cancelled.set()
        while await stay.next_event() is not GONE:
            pass
        return at, slot, late_events

    try:
        at, slot, late_events = asyncio.run(run())
    finally:
        engine.close()
    steps_after = [active for t, active in slow.steps if t > at]
    leave_steps = 0
    for active in steps_after:
        if slot not in active:
            break
        leave_steps += 1
    # Of the steps begun after it left, only one begun that very moment may still advance it.
    assert leave_steps <= 1
    assert isinstance(late_events[-1], Finish) and late_events[-1].completion_tokens == 5
    assert engine.stats.cancelled == 2 and not engine.running


def test_serial_when_batching_is_off_or_unsupported(built):
    tok = built.tokenizer
    for engine in (
        Engine(built.runtime, tok, max_batch=1),
        Engine(SlowRuntime(built.runtime, 0), tok, max_batch=8),  # no batched API
    ):
        engine.close()
        assert not engine.batched


def stream(http: httpx.Client, max_tokens: int) -> httpx.Response:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True}
    return http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)


def test_full_queue_is_503_when_every_seat_is_busy():
    holder = {}

    def load():
        built = build_stories()
        built.runtime = holder["runtime"] = SlowBatchRuntime(built.runtime, 0.02)
        return built

    opts = ServerOptions(model_id=MODEL_ID, max_queue=1, max_batch=2)
    with live_server(opts, load=load) as srv, srv.http() as a, srv.http() as b:
        with srv.http() as c, srv.http() as d:
            engine = srv.engine
            first, second = stream(a, 30), stream(b, 30)
            wait_for(lambda: engine.running == 2)  # both seats busy
            third = stream(c, 5)  # waits for a seat: the queue (size 1) is now full
            wait_for(lambda: engine.waiting == 1)
            r = d.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "server_busy"
            for response in (first, second, third):
                payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                assert payloads[-1] == "[DONE]"
                assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
                response.close()
            hi = d.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert hi.status_code == 200
            metrics = dict(
                line.split() for line in d.get("/metrics").text.splitlines() if line[0] != "#"
            )
        assert max(len(active) for _, active in holder["runtime"].steps) == 2
        steps = int(metrics["torchchat_decode_steps_total"])
        assert steps > 0 and int(metrics["torchchat_decode_rows_total"]) > steps


def test_max_batch_option():
    args = build_parser().parse_args(["server", "model.bin", "--max-batch", "3"])
    assert args.max_batch == 3
    assert build_parser().parse_args(["server", "model.bin"]).max_batch == ServerOptions.max_batch
    with pytest.raises(TorchchatError, match="--max-batch"):
        ServerOptions(max_batch=0)


class GatedBatchRuntime(SlowBatchRuntime):
    """Paged steps wait until `release` is set: nothing finishes before then."""

    def __init__(self, inner):
        super().__init__(inner, 0)
        self.release = threading.Event()

    def step(self, chunks):
        assert self.release.wait(60), "never released"
        return super().step(chunks)


def test_burst_fills_free_seats_before_the_queue():
    """12 simultaneous requests with 8 seats and a queue of 4 are all served; the 13th is 503."""
    holder = {}

    def load():
        built = build_stories()
        built.runtime = holder["runtime"] = GatedBatchRuntime(built.runtime)
        return built

    opts = ServerOptions(model_id=MODEL_ID, max_queue=4, max_batch=8)
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    with live_server(opts, load=load) as srv:
        engine, runtime = srv.engine, holder["runtime"]
        with ThreadPoolExecutor(12) as pool:
            clients = [srv.http() for _ in range(13)]
            burst = [pool.submit(c.post, "/v1/completions", json=body) for c in clients[:12]]
            # Every one is accepted while no decode step can run (so none can finish).
            wait_for(lambda: engine.running + engine.waiting == 12)
            r = clients[12].post("/v1/completions", json=body)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "server_busy"
            runtime.release.set()
            responses = [f.result() for f in burst]
            for c in clients:
                c.close()
        assert [r.status_code for r in responses] == [200] * 12
        texts = {r.json()["choices"][0]["text"] for r in responses}
        assert len(texts) == 1 and {r.json()["usage"]["completion_tokens"] for r in responses} == {
            4
        }
        assert max(len(active) for _, active in runtime.steps) == 8


def test_an_idle_engine_starts_a_burst_as_one_step(built, monkeypatch):
    """Requests still being read (`Engine.arrival`) hold an idle engine's first step until they
    are queued or end; a request alone is not held."""
    monkeypatch.setattr(Engine, "BURST_WAIT_S", 60.0)  # only the arrivals end the wait here
    runtime = SlowBatchRuntime(built.runtime, 0)
    engine = Engine(runtime, built.tokenizer, max_batch=4)
    prompts = [built.tokenizer.encode(t, bos=True) for t in ("Once upon a time", "The dog")]
    alone: list[int] = []

    def submitted(job: Job, arrival=None) -> Job:
        engine.submit(job, arrival)
        return job

    async def run() -> None:
        # Alone: started at once (held for BURST_WAIT_S, it would not end within the timeout).
        t0 = time.monotonic()
        await drain(submitted(Job([Choice(0, prompts[0], 2, GREEDY)])))
        assert time.monotonic() - t0 < 30
        alone.append(len(runtime.steps))
        # A burst: the second request is still being read when the first is queued.
        late, gone = engine.arrival(), engine.arrival()
        first = submitted(Job([Choice(0, prompts[0], 2, GREEDY)]))
        await asyncio.sleep(0.05)
        assert len(runtime.steps) == alone[0]  # held
        gone.end()  # a request that ended without a job (an error answered) no longer counts
        await asyncio.sleep(0.05)
        assert len(runtime.steps) == alone[0]
        second = submitted(Job([Choice(0, prompts[1], 2, GREEDY)]), late)
        await asyncio.gather(drain(first), drain(second))

    try:
        asyncio.run(run())
    finally:
        engine.close()
    assert len(runtime.steps[alone[0]][1]) == 2  # both in the burst's first step
    assert engine.arriving == 0
