"""The paged engine through HTTP: chats sharing a system prompt prefill it once and report it
in `cached_tokens`; one stream gives what `--max-batch 1` gives."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import MODEL_ID, live_server
from torchchat.server.config import ServerOptions

SYSTEM = " ".join(["You are a storyteller who tells short stories about cats and dogs."] * 6)


def metrics(srv) -> dict[str, float]:
    with srv.http() as http:
        text = http.get("/metrics").text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line[0] != "#")}


def test_concurrent_chats_with_one_system_prompt_prefill_it_once():
    opts = ServerOptions(model_id=MODEL_ID, max_batch=4, max_tokens_limit=64)
    questions = ["Tell me about a cat.", "And a dog?", "A bird, please.", "Now a fish."]
    with live_server(opts) as srv:
        client = srv.client()

        def chat(question: str):
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
            ]
            return client.chat.completions.create(
                model=MODEL_ID, messages=messages, max_tokens=8, temperature=0
            )

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(chat, questions))
        m = metrics(srv)
    usage = [r.usage for r in replies]
    cached = sorted(u.prompt_tokens_details.cached_tokens for u in usage)
    # One of them computed the system prompt; the others shared its full 16-token blocks, and
    # copied the positions of the block where it ends that are the same in theirs (so they
    # differ by the tokens their own messages happen to share).
    assert cached[0] == 0 and cached[1] >= 16 * 4 and cached[3] - cached[1] < 16
    prompt_tokens = sum(u.prompt_tokens for u in usage)
    assert m["torchchat_cached_tokens_total"] == sum(cached)
    assert m["torchchat_prefill_tokens_total"] == prompt_tokens - sum(cached)
    assert m["torchchat_kv_cache_bytes"] > 0


@pytest.mark.parametrize("prompt", ["Once upon a time", "The little dog ran to the park and"])
def test_one_stream_equals_max_batch_1(prompt):
    body = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "logprobs": 2}
    got = {}
    for max_batch in (8, 1):
        opts = ServerOptions(model_id=MODEL_ID, max_batch=max_batch, max_tokens_limit=64)
        with live_server(opts) as srv, srv.http() as http:
            assert srv.engine.batched == (max_batch > 1)
            got[max_batch] = http.post("/v1/completions", json=body).json()["choices"][0]
    paged, single = got[8], got[1]
    assert paged["text"] == single["text"]
    assert paged["logprobs"]["tokens"] == single["logprobs"]["tokens"]
    lp, ls = paged["logprobs"]["token_logprobs"], single["logprobs"]["token_logprobs"]
    assert lp == pytest.approx(ls, abs=1e-4)
