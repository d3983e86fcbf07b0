"""Test helpers shared across the suite: paths to ../shared assets and tiny random models."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """Path of a read-only asset under ../shared (relative to the repo root)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"shared test asset missing: {path}")
    return path


STORIES_BIN = SHARED / "models" / "stories260K" / "stories260K.bin"
STORIES_TOK = SHARED / "models" / "stories260K" / "tok512.model"


def random_args(**overrides):
    """A tiny ModelArgs; overrides pick the variant (GQA, bias, rope scaling, ...)."""
    from torchchat.model.config import ModelArgs

    base = dict(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=48, max_seq_len=64
    )
    base.update(overrides)
    return ModelArgs(**base)


def random_state_dict(args, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for args in native names (norm weights away from 1 to catch mix-ups)."""
    from torchchat.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(args)
    sd = {}
    for name, t in model.state_dict().items():
        scale = 0.5 if name.endswith("norm.weight") else 0.2
        sd[name] = (1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(t.shape)
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


class PickleBomb:
    """Unpickling this would create the file `target`: what a hostile checkpoint does."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def run_torchchat(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 300):
    """`python -m torchchat ARGS` in a subprocess, as a user runs it."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "torchchat", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def one_line_error(p) -> str:
    """Assert a failed command said exactly one line on stderr, nothing on stdout, exit 1."""
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == ""
    return lines[0]
