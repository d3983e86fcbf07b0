"""Rolling-window perplexity equals a hand computation from the model's log-probabilities."""

from __future__ import annotations

import math
import re

import pytest
import sentencepiece as spm
import torch
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from tests.support import STORIES_TOK
from torchchat.eval.perplexity import (
    rolling_loglikelihood,
    rolling_windows,
    wikitext_perplexity,
)
from torchchat.eval.wikitext import split_documents
from torchchat.runtime.base import ModelRuntime

from .conftest import make_tiny

RAW = (
    " \n = Alpha = \n \n The cat sat on the mat . It was happy . \n \n"
    " = Beta = \n \n Once upon a time , there was a little girl named Lily . She liked to play "
    "outside in the park with her friends . One day she found a big red ball @-@ shaped stone . "
    "\n \n = = Later = = \n \n They went home and had 1 @,@ 000 cookies . \n \n"
)
BOS = 1


def document_tokens(page: str) -> list[int]:
    """BOS + sentencepiece ids of lm-eval's detokenized page, straight from the library."""
    sp = spm.SentencePieceProcessor(model_file=str(STORIES_TOK))
    return [BOS, *sp.encode(wikitext_detokenizer({"page": page}))]


def hand_loglikelihood(tiny, tokens: list[int], window: int) -> float:
    """Each token scored in its own model call over the context its window gives it.

    The tokens are cut into consecutive chunks of `window`; a chunk is predicted from the
    `window` positions of [prefix] + tokens that end just before its last token."""
    seq = [BOS, *tokens]  # the prefix, then the document (which starts with its own BOS)
    total = 0.0
    for j, token in enumerate(tokens):
        chunk_end = min((j // window + 1) * window, len(tokens))
        context = seq[max(0, chunk_end - window) : j + 1]
        total += float(tiny.logprobs(context)[-1, token])
    return total


def test_pages_of_the_sample_text():
    pages = split_documents(RAW)
    assert [p.split("\n")[0] for p in pages] == [" = Alpha = ", " = Beta = "]


def test_metrics_equal_a_hand_computation(tiny):
    pages = split_documents(RAW)
    docs = [document_tokens(p) for p in pages]
    assert len(docs[1]) > 3 * tiny.runtime.max_seq_len  # the second page spans several windows

    result = wikitext_perplexity(tiny.runtime, tiny.tokenizer, pages, show_progress=False)

    ll = sum(hand_loglikelihood(tiny, d, tiny.runtime.max_seq_len) for d in docs)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    n_bytes = sum(len(p.encode("utf-8")) for p in pages)
    assert result.tokens == sum(map(len, docs)) and result.documents == 2
    assert (result.words, result.bytes) == (words, n_bytes)
    assert result.loglikelihood == pytest.approx(ll, rel=1e-5)
    metrics = result.metrics()
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)


def test_one_window_is_the_plain_full_sequence_loglikelihood():
    tiny = make_tiny(128)
    page = split_documents(RAW)[1]
    tokens = document_tokens(page)
    assert len(tokens) <= 128
    seq = [BOS, *tokens]
    logprobs = tiny.logprobs(seq[:-1])
    plain = sum(float(logprobs[i, seq[i + 1]]) for i in range(len(tokens)))
    result = wikitext_perplexity(tiny.runtime, tiny.tokenizer, [page], show_progress=False)
    assert result.loglikelihood == pytest.approx(plain, rel=1e-6)


def test_no_bos_scores_the_text_tokens_only(tiny):
    page = split_documents(RAW)[0]
    tokens = document_tokens(page)[1:]
    result = wikitext_perplexity(
        tiny.runtime, tiny.tokenizer, [page], add_bos=False, show_progress=False
    )
    assert result.tokens == len(tokens)
    assert result.loglikelihood == pytest.approx(hand_loglikelihood(tiny, tokens, 16), rel=1e-5)


class RecordingRuntime(ModelRuntime):
    """Records what each forward call feeds; logits are a fixed function of the tokens."""

    def __init__(self, max_seq_len: int):
        self.max_seq_len, self.calls = max_seq_len, []

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        assert start_pos == 0 and tokens.shape[1] <= self.max_seq_len
        self.calls.append(tokens[0].tolist())
        return torch.nn.functional.one_hot(tokens, 50).float()


@pytest.mark.parametrize("window", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("n", [0, 1, 2, 6, 7, 8, 15, 16, 17, 40])
def test_windows_are_lm_evals_disjoint_rolling_windows(n, window):
    tokens = [(7 * i + 3) % 50 for i in range(n)]
    expected = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(
            tokens, prefix_token=49, max_seq_len=window, context_len=1
        )
    ]
    assert [tokens[s:e] for s, e in rolling_windows(n, window)] == [cont for _, cont in expected]
    runtime = RecordingRuntime(window)
    rolling_loglikelihood(runtime, tokens, prefix=49)
    # HFLM feeds (context + continuation)[-(max_length + 1):][:-1] for each window.
    assert runtime.calls == [(ctx + cont)[-(window + 1) :][:-1] for ctx, cont in expected]
