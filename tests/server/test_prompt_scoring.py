"""Prompt scoring: `echo` with `logprobs` returns each prompt token's logprob (the first null)
and its top alternatives, as one forward pass over the prompt computes them, also with
`max_tokens: 0`; text offsets place every token in the returned text."""

from __future__ import annotations

import json

import pytest
import torch

from tests.server.conftest import MODEL_ID, build_stories, live_server
from torchchat.server.config import ServerOptions

PROMPT = "Once upon a time"
IDS = [1, 403, 407, 261, 378]  # BOS " Once" " upon" " a" " time"


@pytest.fixture(scope="module")
def reference():
    """log-softmax at every position of one call over IDS, on a model of its own."""
    built = build_stories()
    with torch.no_grad():
        return torch.log_softmax(built.runtime.score(IDS).float(), dim=-1)


def expected_prompt(reference, top: int) -> tuple[list, list]:
    values, tops = [None], [None]
    for i, token in enumerate(IDS[1:]):
        row = reference[i]
        values.append(float(row[token]))
        best = torch.topk(row, top)
        alternatives = {int(t): float(v) for t, v in zip(best.indices, best.values, strict=True)}
        tops.append({**alternatives, token: float(row[token])})
    return values, tops


def by_token(top: dict | None, texts: dict[int, str]) -> dict | None:
    return None if top is None else {texts[t]: v for t, v in top.items()}


@pytest.mark.parametrize("max_batch", [8, 1])  # the batched engine and the one-at-a-time one
def test_echo_logprobs_score_the_prompt(reference, max_batch):
    opts = ServerOptions(model_id=MODEL_ID, max_batch=max_batch, max_tokens_limit=64)
    with live_server(opts) as srv, srv.http() as http:
        tok = srv.engine.tokenizer
        texts = {i: tok.token_bytes(i).decode("utf-8", "replace") for i in range(tok.vocab_size)}
        body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0}
        r = http.post("/v1/completions", json=body).json()
        (choice,) = r["choices"]
        assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
        assert r["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": 0,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        lp = choice["logprobs"]
        values, tops = expected_prompt(reference, 2)
        assert lp["tokens"] == ["", " Once", " upon", " a", " time"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(values[1:], rel=1e-5)
        for got, want in zip(lp["top_logprobs"][1:], tops[1:], strict=True):
            assert got == pytest.approx(by_token(want, texts), rel=1e-5)
        # "Once upon a time": the dummy-prefix space of " Once" is not in the text.
        assert lp["text_offset"] == [0, 0, 4, 9, 11]

        # Generating after the scored prompt: its tokens follow, greedy as without echo.
        more = {**body, "max_tokens": 6, "temperature": 0}
        (scored,) = http.post("/v1/completions", json=more).json()["choices"]
        plain = http.post("/v1/completions", json={**more, "echo": False}).json()["choices"][0]
        assert scored["text"] == PROMPT + plain["text"]
        lp2 = scored["logprobs"]
        assert lp2["token_logprobs"][:5] == lp["token_logprobs"]
        assert lp2["tokens"][5:] == plain["logprobs"]["tokens"]
        assert lp2["token_logprobs"][5:] == pytest.approx(
            plain["logprobs"]["token_logprobs"], rel=1e-5
        )
        starts = [len(PROMPT)]
        for token in plain["logprobs"]["tokens"][:-1]:
            starts.append(starts[-1] + len(token))
        assert lp2["text_offset"] == [0, 0, 4, 9, 11, *starts]

        # Token ids: the text is what the tokens spell, and offsets are its positions.
        ids = {**body, "prompt": IDS}
        (by_ids,) = http.post("/v1/completions", json=ids).json()["choices"]
        assert by_ids["text"] == " Once upon a time"
        assert by_ids["logprobs"]["text_offset"] == [0, 0, 5, 10, 12]
        assert by_ids["logprobs"]["token_logprobs"] == lp["token_logprobs"]

        # Streamed: the echo chunk carries the prompt's logprobs.
        stream = http.post("/v1/completions", json={**more, "stream": True})
        chunks = [
            json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")
        ]
        first = chunks[0]["choices"][0]
        assert first["text"] == PROMPT and first["logprobs"] == lp
        assert "".join(c["choices"][0]["text"] for c in chunks) == scored["text"]


def test_tokenizer_routes_tokenize_as_the_server_does(server):
    with server.http() as http:
        info = http.get("/tokenizer_info").json()
        assert info == {
            "tokenizer_class": "sentencepiece",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "model_max_length": 512,
            "chat_template": None,
        }
        plain = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False})
        assert plain.json() == {"count": 4, "max_model_len": 512, "tokens": IDS[1:]}
        assert http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"] == IDS
        special = http.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False})
        assert special.json()["tokens"] == [2]
        assert http.post("/detokenize", json={"tokens": IDS}).json() == {"prompt": PROMPT}
        bad = http.post("/detokenize", json={"tokens": [1, 512]})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_value"
