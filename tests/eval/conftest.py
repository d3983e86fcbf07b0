"""Fixtures for the eval tests: a tiny random model on the stories260K tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.support import STORIES_TOK, random_args, random_state_dict
from torchchat.builder import build_transformer
from torchchat.model.transformer import Transformer
from torchchat.runtime.eager import EagerRuntime
from torchchat.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Tiny:
    runtime: EagerRuntime  # what eval uses: the one model interface
    reference: Transformer  # a second instance with its own cache, for hand computations
    tokenizer: Tokenizer

    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        """log-softmax at every position of one full-sequence call from position 0."""
        with torch.no_grad():
            logits = self.reference(torch.tensor([tokens]), torch.arange(len(tokens)))
        return torch.log_softmax(logits[0].double(), dim=-1)


def make_tiny(window: int) -> Tiny:
    args = random_args(vocab_size=512, max_seq_len=max(64, window))
    sd = random_state_dict(args, seed=3)
    reference = build_transformer(args, sd, torch.float32, "cpu").eval()
    reference.setup_caches(1, args.max_seq_len)
    runtime = EagerRuntime(build_transformer(args, sd, torch.float32, "cpu"), window)
    return Tiny(runtime, reference, load_tokenizer(STORIES_TOK))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads spin badly on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    """Windows of 16 tokens (the runtime's max_seq_len), so documents span several."""
    return make_tiny(16)
