"""Fuzz: mutated headers of real GGUF files only ever give one clean line of TorchchatError.

Each example flips or overwrites bytes of the header (key/value and tensor-info sections),
truncates the file, or writes extreme values into a known count/length/dim/type/offset field,
then runs the whole loader (load_checkpoint, the GGUF tokenizer, building the model on the
meta device) under a time limit. Deterministic (derandomized) so CI sees the same cases.
"""

from __future__ import annotations

import re
import signal
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gguf.gguf_files import (
    QUANTS,
    STORIES_GGUF,
    VOCAB_SPM_GGUF,
    header_fields,
    tiny_bpe_vocab_gguf,
)
from torchchat.builder import build_transformer
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.gguf_header import validate_gguf
from torchchat.errors import TorchchatError
from torchchat.tokenizer.gguf import gguf_tokenizer

# seed -> (its bytes, examples); the 32000-token vocabulary-only file is the slowest to load.
SEEDS = {
    "stories260K": (STORIES_GGUF.read_bytes, 2500),
    "Q4_K_M": ((QUANTS / "tiny-random-Q4_K_M.gguf").read_bytes, 1200),
    "vocab-spm": (VOCAB_SPM_GGUF.read_bytes, 300),
    "vocab-bpe": (tiny_bpe_vocab_gguf, 800),  # a small `gpt2` vocabulary: merges, pre, specials
}
EXTREMES = [0, 1, 2, 3, 4, 5, 8, 31, 32, 33, 64, 255, 256, 4095, 2**16, 2**31 - 1, 2**31,
            2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip
PER_EXAMPLE_SECONDS = 10
_FIELD = re.compile(r"GGUF ([^:]+):")


class Hang(Exception):
    """An example ran past its time limit."""


@contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def mutations(size: int, span: int, n_fields: int) -> st.SearchStrategy:
    """Lists of 1-3 edits: bit flips, overwrites, truncations and extreme field values."""
    header_pos = st.integers(4, span - 1)  # past the magic: a broken magic is another format
    flip = st.tuples(st.just("flip"), header_pos, st.integers(0, 7))
    write = st.tuples(st.just("write"), header_pos, st.binary(min_size=1, max_size=8))
    # One printable character keeps strings valid UTF-8: it renames keys, tokens and merges.
    char = st.tuples(
        st.just("write"), header_pos, st.binary(min_size=1, max_size=1).filter(bytes.isalnum)
    )
    cut = st.tuples(
        st.just("cut"), st.one_of(st.integers(0, span), st.integers(0, size - 1)), st.none()
    )
    value = st.one_of(st.sampled_from([*EXTREMES, size - 1, size, size + 1]), st.integers(0, 2**64 - 1))  # fmt: skip
    field = st.tuples(st.just("field"), st.integers(0, n_fields - 1), value)
    return st.lists(st.one_of(flip, write, char, cut, field, field), min_size=1, max_size=3)


def mutate(data: bytes, edits: list[tuple], fields: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, arg in edits:
        if kind == "flip" and where < len(buf):
            buf[where] ^= 1 << arg
        elif kind == "write" and where < len(buf):
            buf[where : where + len(arg)] = arg[: len(buf) - where]
        elif kind == "cut":
            del buf[where:]
        elif kind == "field":
            _, offset, width = fields[where]
            if offset + width <= len(buf):
                buf[offset : offset + width] = (arg % 2 ** (8 * width)).to_bytes(width, "little")
    return bytes(buf)


def load_everything(path: Path) -> str:
    """Run the whole GGUF path; "ok" or the field named by the one-line TorchchatError."""
    try:
        with time_limit(PER_EXAMPLE_SECONDS):
            ckpt = load_checkpoint(path)
            gguf_tokenizer(ckpt.extra["gguf"].metadata, str(path))
            if ckpt.state_dict:
                build_transformer(ckpt.args, ckpt.state_dict, torch.float32, "cpu")
    except TorchchatError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, message
        match = _FIELD.search(message)
        return match.group(1).split("[")[0] if match else message.split(": ", 1)[-1][:40]
    return "ok"


@pytest.fixture(scope="module")
def scratch():
    """Per-example files go to RAM when /dev/shm exists (thousands of rewrites)."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as folder:
        yield Path(folder)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_headers_fail_cleanly(seed, scratch):
    read, examples = SEEDS[seed]
    data = read()
    path = scratch / f"{seed}.gguf"
    path.write_bytes(data)
    assert load_everything(path) == "ok"
    span = min(validate_gguf(path).data_start, 16384, len(data))
    fields = header_fields(data)
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutations(len(data), span, len(fields)))
    def run(edits):
        path.write_bytes(mutate(data, edits, fields))
        outcomes[load_everything(path)] += 1

    run()
    print(f"{seed}: {sum(outcomes.values())} cases, {outcomes.most_common()}")
    assert sum(outcomes.values()) >= examples
    # Both sides are explored: files that still load and many distinct rejected fields.
    assert outcomes["ok"] > 0 and len(outcomes) > 10
