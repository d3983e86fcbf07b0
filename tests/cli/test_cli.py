"""End to end through the `torchchat` command, as a user runs it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.generate.test_generator import LLAMA2C_STORIES260K
from tests.support import (
    STORIES_BIN,
    STORIES_TOK,
    PickleBomb,
    one_line_error,
    random_args,
    random_state_dict,
    run_torchchat,
)
from torchchat.tokenizer import load_tokenizer


def run(*args, stdin: str | None = None):
    return run_torchchat(*args, stdin=stdin)


def test_generate_prints_only_the_text():
    p = run("generate", STORIES_BIN, "--tokenizer-path", STORIES_TOK, "--prompt", "Once upon a time",
            "--temperature", "0", "--max-new-tokens", "20")  # fmt: skip
    assert p.returncode == 0, p.stderr
    # The greedy story from BOS begins "Once upon a time", so its continuation is llama2.c's.
    text = p.stdout.removesuffix("\n")
    assert len(text) > 60 and LLAMA2C_STORIES260K.startswith("Once upon a time" + text)
    assert "time to first token" in p.stderr and "tok/s" in p.stderr and "GB/s" in p.stderr


def test_generate_num_samples_seeded_is_reproducible():
    args = ("generate", STORIES_BIN, "--prompt", "Once", "--max-new-tokens", "15", "--num-samples", "2",
            "--seed", "42", "--temperature", "1.0", "--quiet")  # fmt: skip
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.count("\n") >= 2
    assert a.stderr.count("tok/s") == 0  # --quiet


def test_chat_second_turn_prefills_only_its_own_tokens():
    p = run("chat", STORIES_BIN, "--temperature", "0", "--max-new-tokens", "12",
            stdin="Hello there\nHow are you?\n/bye\n")  # fmt: skip
    assert p.returncode == 0, p.stderr
    turns = re.findall(r"prompt (\d+) tokens(?: \(\+(\d+) reused from cache\))?", p.stderr)
    assert len(turns) == 2
    tok = load_tokenizer(STORIES_TOK)
    first = tok.encode("<s>[INST] Hello there [/INST]", allow_special=True)
    assert int(turns[0][0]) == len(first) and turns[0][1] == ""
    # Turn 1 stopped at the token limit: its last sampled token was never fed, so turn 2 feeds it
    # plus Meta's llama2 continuation, and nothing of the conversation before.
    second = tok.encode(" </s><s>[INST] How are you? [/INST]", allow_special=True)
    assert int(turns[1][0]) == 1 + len(second)
    assert int(turns[1][1]) == len(first) + 12 - 1
    assert len(p.stdout.splitlines()) == 2


def test_chat_reset_and_context_full():
    p = run("chat", STORIES_BIN, "--temperature", "0", "--max-new-tokens", "8", "--max-seq-length", "40",
            stdin="Hello there\nSecond message that will not fit into the tiny context\n/reset\nHi\n/bye\n")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "context is full" in p.stderr
    assert "conversation reset" in p.stderr
    assert len(re.findall(r"prompt \d+ tokens", p.stderr)) == 2


def test_missing_path():
    assert "not found" in one_line_error(
        run("generate", "--checkpoint-path", "/nonexistent/model.pth")
    )


def test_unknown_model_alias():
    assert "unknown model 'llama-9000'" in one_line_error(run("generate", "llama-9000"))


def test_config_mismatch():
    line = one_line_error(run("generate", STORIES_BIN, "--params-table", "stories15M"))
    assert "has shape" in line and "expects" in line


def test_unreadable_tokenizer(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00garbage\xff" * 50)
    assert "tokenizer" in one_line_error(run("generate", STORIES_BIN, "--tokenizer-path", bad))


def test_tokenizer_smaller_than_the_models_output(tmp_path):
    """A model of 2048 tokens with stories260K's 512-token tokenizer: the first token it picks is
    past the tokenizer (its output rows for ids < 512 are zero, the rest random), so the wrong
    tokenizer shows as one line and nothing is printed."""
    args = random_args(vocab_size=2048)
    sd = random_state_dict(args)
    sd["output.weight"][:512] = 0.0
    torch.save(sd, tmp_path / "model.pth")
    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                            "vocab_size", "hidden_dim", "max_seq_len")}  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    p = run("generate", "--checkpoint-path", tmp_path / "model.pth", "--params-path",
            tmp_path / "params.json", "--tokenizer-path", STORIES_TOK, "--temperature", "0",
            "--max-new-tokens", "4")  # fmt: skip
    assert "outside the tokenizer's 512 tokens" in one_line_error(p)


def test_prompt_longer_than_context():
    line = one_line_error(
        run(
            "generate", STORIES_BIN, "--prompt", "Once upon a time " * 200, "--max-seq-length", "64"
        )
    )
    assert "does not fit the context" in line


def test_hostile_pickle(tmp_path):
    target = tmp_path / "created_by_pickle"
    ckpt = tmp_path / "model.pth"
    torch.save(
        {"tok_embeddings.weight": torch.zeros(2, 2), "payload": PickleBomb(str(target))}, ckpt
    )
    assert "refusing to load" in one_line_error(run("generate", "--checkpoint-path", ckpt))
    assert not target.exists()


def test_convert_then_generate_same_text(tmp_path):
    out = tmp_path / "converted"
    p = run("convert", STORIES_BIN, "--output", out)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == ["model.pth", "tok512.model"]
    args = (
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
        "--quiet",
    )
    a = run("generate", STORIES_BIN, *args)
    b = run("generate", out, *args)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stdout == b.stdout
    again = run("convert", STORIES_BIN, "--output", out)
    assert "not empty" in one_line_error(again)


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_help_lists_common_options(verb):
    p = run(verb, "--help")
    for opt in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--dtype", "--device",
                "--compile", "--compile-prefill", "--max-seq-length", "--tokenizer-path", "--params-path"):  # fmt: skip
        assert opt in p.stdout


def test_verbose_names_the_kernels_level_in_use():
    """-v says once which instruction-set level runs the CPU kernels, or why torch's ops do."""
    import os

    from torchchat import kernels

    cmd = ["generate", STORIES_BIN, "--prompt", "Once", "--max-new-tokens", "2", "-v"]
    p = run_torchchat(*cmd)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count(kernels.status()) == 1
    off = run_torchchat(*cmd, env={**os.environ, "TORCHCHAT_ISA": "off"})
    assert off.returncode == 0 and "CPU kernels off (TORCHCHAT_ISA=off)" in off.stderr
