"""load_tokenizer: format detection from content, folders, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torchchat.errors import TorchchatError
from torchchat.tokenizer import load_tokenizer, tokenizer_file

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"


def one_line_error(path) -> str:
    with pytest.raises(TorchchatError) as info:
        load_tokenizer(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_detects_by_content_not_name(tmp_path):
    llama3 = tmp_path / "weird.json"
    os.symlink(SHARED / "llama3-tokenizer" / "tokenizer.model", llama3)
    assert load_tokenizer(llama3).kind == "tiktoken"
    stories = tmp_path / "tokenizer.json"
    os.symlink(SHARED / "stories260K" / "tok512.model", stories)
    assert load_tokenizer(stories).kind == "sentencepiece"


def test_folder_lookup(tmp_path):
    assert load_tokenizer(SHARED / "llama3-tokenizer").kind == "tiktoken"  # tokenizer.model
    assert load_tokenizer(SHARED / "stories260K").vocab_size == 512  # the only *.model
    assert tokenizer_file(tmp_path) is None
    assert "tokenizer not found in" in one_line_error(tmp_path)
    (tmp_path / "a.model").write_bytes(b"x")
    (tmp_path / "b.model").write_bytes(b"x")
    assert "several tokenizers" in one_line_error(tmp_path)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.model"
    assert one_line_error(missing) == f"tokenizer not found: {missing} (pass --tokenizer-path)"


GARBAGE = {
    "empty": b"",
    "binary": b"\x00\x01garbage\xff" * 50,
    "text": b"just some text\nmore text\n",
    "json-list": b"[1, 2, 3]",
    "json-without-model": b'{"vocab": {}}',
}


@pytest.mark.parametrize("content", GARBAGE.values(), ids=GARBAGE.keys())
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(content)
    assert one_line_error(path).startswith(f"cannot read tokenizer {path}: ")


def test_broken_tiktoken_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nnot base64! 1\n")
    assert "line 2" in one_line_error(path)
