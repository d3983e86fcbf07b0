"""Rolling-window log-likelihood of documents and lm-evaluation-harness's perplexity metrics.

Definitions follow lm-eval (`wikitext` task, HFLM backend):
- a document is scored after one prefix token (BOS, else EOS: `HFLM.prefix_token_id`), and its
  tokens are the tokenizer's default encoding (with BOS when the tokenizer adds one);
- windows are `utils.get_rolling_token_windows(context_len=1)` made disjoint by
  `utils.make_disjoint_window`: each scores up to max_seq_len tokens, conditioned on the
  max_seq_len tokens before its last one (the first window on the prefix and what it scores);
- word_perplexity = exp(-sum ll / sum words), byte_perplexity = exp(-sum ll / sum bytes),
  bits_per_byte = -sum ll / sum bytes / ln 2 (`weighted_perplexity`, `bits_per_byte`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from torchchat.errors import TorchchatError
from torchchat.eval.wikitext import count_bytes, count_words, detokenize
from torchchat.runtime.base import ModelRuntime
from torchchat.tokenizer import Tokenizer


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token every document is conditioned on: BOS, else EOS (lm-eval's prefix_token_id)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise TorchchatError("the tokenizer has neither BOS nor EOS: nothing to condition on")
    return token


def encode_document(tokenizer: Tokenizer, text: str, add_bos: bool) -> list[int]:
    """Token ids of a whole document; special-token text maps to its id, as HF's encode does."""
    return tokenizer.encode(text, bos=add_bos, allow_special=True)


def rolling_windows(n_tokens: int, max_seq_len: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) scored by each of lm-eval's disjoint rolling windows."""
    # With context_len=1 every window predicts max_seq_len tokens (the last one fewer).
    return [(s, min(s + max_seq_len, n_tokens)) for s in range(0, n_tokens, max_seq_len)]


def forward_from_start(runtime: ModelRuntime, tokens: Sequence[int]) -> torch.Tensor:
    """fp32 log-probabilities (len(tokens), vocab) of one model call at positions 0.."""
    return torch.log_softmax(runtime.score(tokens).float().cpu(), dim=-1)


@torch.no_grad()
def rolling_loglikelihood(
    runtime: ModelRuntime,
    tokens: Sequence[int],
    prefix: int,
    max_seq_len: int | None = None,
    progress: tqdm | None = None,
) -> float:
    """Sum of log p(token | what precedes it) over all tokens, one model call per window."""
    max_seq_len = max_seq_len or runtime.max_seq_len
    if not 1 <= max_seq_len <= runtime.max_seq_len:
        raise TorchchatError(
            f"window of {max_seq_len} tokens does not fit the model's {runtime.max_seq_len}"
        )
    seq = [prefix, *tokens]  # tokens[i] is seq[i + 1], predicted from seq[: i + 1]
    total = 0.0
    for start, end in rolling_windows(len(tokens), max_seq_len):
        first = max(0, end - max_seq_len)  # the window feeds seq[first:end], at most max_seq_len
        logprobs = forward_from_start(runtime, seq[first:end])[start - first :]
        targets = torch.tensor(tokens[start:end], dtype=torch.long)
        total += float(logprobs.gather(-1, targets[:, None]).sum())
        if progress is not None:
            progress.update(1)
    return total


@dataclass
class PerplexityResult:
    """Summed log-likelihood and the counts lm-eval's wikitext metrics divide it by."""

    loglikelihood: float = 0.0  # natural log, summed over documents
    words: int = 0
    bytes: int = 0
    tokens: int = 0
    documents: int = 0

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    def metrics(self) -> dict[str, float]:
        return {
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def wikitext_perplexity(
    runtime: ModelRuntime,
    tokenizer: Tokenizer,
    pages: Sequence[str],
    *,
    add_bos: bool | None = None,
    max_seq_len: int | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """lm-eval's `wikitext` metrics: score the detokenized page, count words/bytes of the original."""
    if not pages:
        raise TorchchatError("no documents to evaluate")
    add_bos = tokenizer.adds_bos if add_bos is None else add_bos
    prefix = prefix_token(tokenizer)
    max_seq_len = max_seq_len or runtime.max_seq_len
    docs = [encode_document(tokenizer, detokenize(page), add_bos) for page in pages]
    n_windows = sum(len(rolling_windows(len(d), max_seq_len)) for d in docs)
    result = PerplexityResult()
    with tqdm(total=n_windows, desc="wikitext", unit="window", disable=not show_progress) as bar:
        for page, tokens in zip(pages, docs, strict=True):
            result.loglikelihood += rolling_loglikelihood(runtime, tokens, prefix, max_seq_len, bar)
            result.words += count_words(page)
            result.bytes += count_bytes(page)
            result.tokens += len(tokens)
            result.documents += 1
    return result
