"""Contract tests with the official `openai` client against a real server on stories260K."""

from __future__ import annotations

import logging
import math

import openai
import pytest

from tests.server.conftest import MODEL_ID, build_stories
from torchchat.chat.templates import Llama2Template
from torchchat.generate.generator import Generator
from torchchat.options import SamplingOptions

HI = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def reference():
    """Greedy text straight from the core generator, to compare the server against."""
    built = build_stories()
    tok = built.tokenizer
    gen = Generator(built.runtime, tok)

    def greedy(prompt_ids: list[int], n: int, stop=()) -> str:
        built.runtime.cached = []
        pieces = gen.stream(
            prompt_ids, max_new_tokens=n, sampling=SamplingOptions(0), stop_strings=stop
        )
        return "".join(pieces)

    def chat_ids(messages) -> list[int]:
        return tok.encode(Llama2Template().render(messages), allow_special=True)

    greedy.chat_ids, greedy.tok = chat_ids, tok
    return greedy


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].object == "model" and models.data[0].owned_by == "torchchat"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


def test_chat_non_stream_matches_core_generator(client, reference):
    r = client.chat.completions.create(model=MODEL_ID, messages=HI, max_tokens=40, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_ID
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == reference(reference.chat_ids(HI), 40)
    assert choice.finish_reason == "length" and choice.logprobs is None
    prompt = len(reference.chat_ids(HI))
    assert r.usage.prompt_tokens == prompt and r.usage.completion_tokens == 40
    assert r.usage.total_tokens == prompt + 40
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL_ID, messages=HI, max_tokens=30, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(model=MODEL_ID, messages=HI, max_tokens=5, stream=True)
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_non_stream_and_stream(client, reference):
    ids = reference.tok.encode("Once upon a time", bos=True)
    r = client.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=25, temperature=0
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == reference(ids, 25)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 25
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt="Once upon a time",
            max_tokens=25,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 25


def test_completions_token_prompt_and_batch(client):
    r = client.completions.create(
        model=MODEL_ID, prompt=["Once upon a time", "The dog"], max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt agree
    alone = client.completions.create(model=MODEL_ID, prompt="The dog", max_tokens=8, temperature=0)
    assert r.choices[2].text == alone.choices[0].text
    assert r.usage.completion_tokens == 32
    by_ids = client.completions.create(model=MODEL_ID, prompt=[1, 400], max_tokens=4, echo=True)
    assert by_ids.usage.prompt_tokens == 2


def test_echo(client):
    r = client.completions.create(
        model=MODEL_ID, prompt="Once upon", max_tokens=5, temperature=0, echo=True
    )
    plain = client.completions.create(
        model=MODEL_ID, prompt="Once upon", max_tokens=5, temperature=0
    )
    assert r.choices[0].text == "Once upon" + plain.choices[0].text


def test_stop_strings_excluded(client):
    full = client.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=60, temperature=0
    )
    text = full.choices[0].text
    stop = text[20:26]  # somewhere in the middle, wherever the token boundaries are
    for stream in (False, True):
        r = client.completions.create(
            model=MODEL_ID,
            prompt="Once upon a time",
            max_tokens=60,
            temperature=0,
            stop=[stop, "zzzz"],
            stream=stream,
        )
        chunks = list(r) if stream else [r]
        out = "".join(c.choices[0].text for c in chunks)
        assert out == text[: text.index(stop)], stream
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kwargs = dict(model=MODEL_ID, messages=HI, max_tokens=40, temperature=1.0)
    a = client.chat.completions.create(**kwargs, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kwargs, seed=1234).choices[0].message.content
    c = client.chat.completions.create(**kwargs, seed=99).choices[0].message.content
    assert a == b and a != c
    s = client.chat.completions.create(**kwargs, seed=1234, stream=True)
    assert "".join(x.choices[0].delta.content or "" for x in s) == a


def test_vanishing_temperature_or_top_p_is_greedy(client):
    # Their limit is greedy; taken literally they overflow logits / temperature or round top_p
    # to 0 in fp32 (no token left to sample), which was a 500.
    kwargs = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=8)
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    assert client.completions.create(**kwargs, temperature=1e-310).choices[0].text == greedy
    assert client.completions.create(**kwargs, top_p=5e-324, seed=1).choices[0].text == greedy


def test_n_choices_are_seed_plus_index(client):
    kwargs = dict(model=MODEL_ID, messages=HI, max_tokens=20, temperature=1.0)
    r = client.chat.completions.create(**kwargs, seed=7, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**kwargs, seed=7 + i) for i in range(3)]
    for choice, one in zip(r.choices, singles, strict=True):
        assert choice.message.content == one.choices[0].message.content
    assert r.usage.completion_tokens == sum(one.usage.completion_tokens for one in singles)
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once, not n times
    streamed = list(client.chat.completions.create(**kwargs, seed=7, n=3, stream=True))
    for i, choice in enumerate(r.choices):
        text = "".join(
            c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i
        )
        assert text == choice.message.content


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=HI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 12
    assert "".join(t.token for t in content).lstrip() == r.choices[0].message.content.lstrip()
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.token == t.top_logprobs[0].token  # greedy picks the most likely token
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-5)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    streamed = client.chat.completions.create(
        model=MODEL_ID, messages=HI, max_tokens=12, temperature=0, logprobs=True, stream=True
    )
    tokens = [
        t
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in tokens] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in tokens)


def test_completion_logprobs(client):
    r = client.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset[0] == 0 and all(
        a < b for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False)
    )
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and math.isclose(top[token], value) and value == max(top.values())


def test_text_parts_equal_string_content(client):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Tell me a story about a cat."}]}
    ]
    a = client.chat.completions.create(model=MODEL_ID, messages=parts, max_tokens=10, temperature=0)
    b = client.chat.completions.create(model=MODEL_ID, messages=HI, max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_system_and_developer_roles(client):
    msgs = [{"role": "system", "content": "Be kind."}, *HI]
    dev = [{"role": "developer", "content": "Be kind."}, *HI]
    a = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=10, temperature=0)
    b = client.chat.completions.create(model=MODEL_ID, messages=dev, max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_prefix_caching_next_turn(client, reference):
    first = client.chat.completions.create(
        model=MODEL_ID, messages=HI, max_tokens=20, temperature=0
    )
    reply = first.choices[0].message.content
    turn2 = [*HI, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(
        model=MODEL_ID, messages=turn2, max_tokens=20, temperature=0
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The whole first prompt (and most of the reply) is reused, not prefilled again ...
    assert cached >= first.usage.prompt_tokens
    assert cached < second.usage.prompt_tokens
    # ... and reusing it does not change the answer.
    assert second.choices[0].message.content == reference(reference.chat_ids(turn2), 20)


def test_default_max_tokens_is_capped(client):
    # No max_tokens: the rest of the context, capped by the server's limit (64 here).
    r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 64
    long_prompt = "Once upon a time there was a cat. " * 45  # 451 tokens
    r = client.completions.create(model=MODEL_ID, prompt=long_prompt, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 512


def test_unknown_fields_ignored_and_logged(client, caplog):
    with caplog.at_level(logging.WARNING, logger="torchchat.server"):
        r = client.chat.completions.create(
            model=MODEL_ID,
            messages=HI,
            max_tokens=3,
            user="someone",
            extra_body={"frobnicate": True, "repetition_penalty": 1.1},
        )
    assert r.choices[0].finish_reason == "length"
    assert "frobnicate" in caplog.text and "repetition_penalty" in caplog.text


def test_context_length_errors(client):
    long_prompt = "Once upon a time there was a cat. " * 200  # ~1600 tokens > 512
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=long_prompt, max_tokens=5)
    assert "maximum context length" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": long_prompt}]
        )
    assert "maximum context length" in e.value.body["message"]
    near = "Once upon a time there was a cat. " * 45  # 451 tokens: fits, but not with 64 more
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=near, max_tokens=64)
    assert "maximum context length" in e.value.body["message"]
    assert e.value.body["param"] == "max_tokens"


def test_metrics_count_requests_and_tokens(server, client):
    client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=3, temperature=0)
    with server.http() as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = dict(
        line.split(" ") for line in r.text.splitlines() if line and not line.startswith("#")
    )
    assert values["torchchat_model_loaded"] == "1"
    assert int(values["torchchat_requests_total"]) >= 1
    assert int(values["torchchat_completion_tokens_total"]) >= 3
    assert "# TYPE torchchat_requests_total counter" in r.text
