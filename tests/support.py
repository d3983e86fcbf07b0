"""Test helpers shared across the suite: paths to ../shared assets, tiny random models, greedy
generation, llama.cpp's tokenizer cases, a free port, waiting for a condition, a server job's events."""

from __future__ import annotations

import socket
import time
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


def greedy(built, prompt: str | list[int] = "", n: int = 40):
    """Greedy generation of up to n tokens through the Generator, as the CLI runs it: (text,
    Result). A text prompt is encoded with BOS; a list of ids is fed as it is."""
    from torchchat.generate.generator import Generator, Result
    from torchchat.options import SamplingOptions

    if isinstance(prompt, str):
        prompt = built.tokenizer.encode(prompt, bos=True)
    res = Result()
    gen = Generator(built.runtime, built.tokenizer)
    text = "".join(gen.stream(prompt, max_new_tokens=n, sampling=SamplingOptions(0), result=res))
    return text, res


def ggml_cases(folder: str, stem: str) -> list[tuple[str, list[int]]]:
    """llama.cpp tokenizer test cases in ../shared/models/FOLDER: (text, expected ids without
    BOS)."""
    base = SHARED / "models" / folder / stem
    # newline="" keeps "\r" and "\r\n" inside cases exactly as written.
    with open(f"{base}.inp", encoding="utf-8", newline="") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(f"{base}.out", encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    # Both files end with a terminator, leaving one empty item after the last case.
    assert texts[-1] == "" and lines[-1] == ""
    texts, lines = texts[:-1], lines[:-1]
    assert len(texts) == len(lines)
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines, strict=True)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 10.0) -> None:
    """Poll `condition()` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


async def drain(job, timeout: float = 60.0) -> list:
    """A server job's events as the engine emits them, up to and including its last one
    (End, or Failed); waiting longer than `timeout` seconds for any one fails."""
    import asyncio

    from torchchat.server.engine import Finish, Piece

    events = []
    while True:
        events.append(await asyncio.wait_for(job.next_event(), timeout))
        if not isinstance(events[-1], Piece | Finish):
            return events
