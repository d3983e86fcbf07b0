"""A fake hub on 127.0.0.1 serving tiny models from ../shared/models, and a CLI runner bound to it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.hub.fake_hub import FakeHub, FakeRepo
from tests.support import (
    STORIES_BIN,
    STORIES_TOK,
    random_args,
    random_state_dict,
    run_torchchat,
    shared_path,
)

LLAMA2_TOK = shared_path("models", "llama2c-tokenizer", "tokenizer.model")
TINY_HF = shared_path("models", "tiny-random-llama-hf")
GATE_TOKEN = "hf_fake_secret_token"


def hf_repo_files() -> dict[str, Path | bytes]:
    """An HF-format repo as published: weights, config, tokenizer, and files torchchat skips."""
    return {
        "config.json": TINY_HF / "config.json",
        "model.safetensors": TINY_HF / "model.safetensors",
        "tokenizer.model": LLAMA2_TOK,
        "pytorch_model.bin": b"the same weights as a pickle: never fetched when safetensors exist",
        "README.md": b"# tiny random llama\n",
        "extra/notes.txt": b"sub-folders are not model files\n",
    }


@pytest.fixture(scope="session")
def tiny_stories_pt(tmp_path_factory) -> Path:
    """A llama2.c training checkpoint (model + model_args) with the Llama 2 vocab, a few MB."""
    args = random_args(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32, vocab_size=32000)
    model_args = dict(
        dim=16, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, hidden_dim=32,
        multiple_of=32, max_seq_len=64, dropout=0.0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tinyllamas") / "stories15M.pt"
    torch.save({"model": random_state_dict(args, seed=3), "model_args": model_args}, path)
    return path


@pytest.fixture(scope="session")
def hub(tiny_stories_pt) -> FakeHub:
    repos = {
        "karpathy/tinyllamas": FakeRepo(
            {
                "stories260K/stories260K.bin": STORIES_BIN,
                "stories260K/tok512.model": STORIES_TOK,
                "stories15M.pt": tiny_stories_pt,
                "README.md": b"# tinyllamas\n",
            }
        ),
        "hf-internal-testing/llama-tokenizer": FakeRepo(
            {"tokenizer.model": LLAMA2_TOK, "README.md": b"# llama tokenizer\n"}
        ),
        "test/tiny-random-llama": FakeRepo(hf_repo_files()),
        "test/gated-llama": FakeRepo(hf_repo_files(), token=GATE_TOKEN),
        "test/flaky-llama": FakeRepo(hf_repo_files(), cut={"model.safetensors": 1_000_000}),
        "test/slow-llama": FakeRepo(hf_repo_files(), stall={"model.safetensors"}),
    }
    with FakeHub(repos) as h:
        yield h


def hub_env(hub_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment: this hub only, a private HF cache and model directory, no proxy."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING")) and k.lower() not in ("http_proxy", "https_proxy")
    }
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(tmp_path / "hf-home"),
        TORCHCHAT_MODELDIR=str(tmp_path / "models"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
    )
    env.update(extra)
    return env


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def torchchat(hub, tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m torchchat ARGS` against the fake hub, as a user would."""

    def run(*args: str | Path, env: dict[str, str] | None = None, timeout: int = 120):
        return run_torchchat(*args, env=env or hub_env(hub.url, tmp_path), timeout=timeout)

    return run
