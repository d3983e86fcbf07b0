"""TiktokenTokenizer (Llama 3) against llama.cpp's test cases and Meta's special-token table."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import tiktoken
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from torchchat.tokenizer import TiktokenTokenizer
from torchchat.tokenizer.tiktoken import LLAMA31_NAMES, PAT_STR, SPECIAL_TOKENS, split_long_runs

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"
SPECIAL_JSON = json.loads((SHARED / "llama3-tokenizer" / "special_tokens.json").read_text())


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """Plain tiktoken, set up as Meta's llama3 tokenizer.py does."""
    lines = (SHARED / "llama3-tokenizer" / "tokenizer.model").read_bytes().splitlines()
    pairs = (line.split() for line in lines if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in pairs}
    return tiktoken.Encoding(
        "reference",
        pat_str=SPECIAL_JSON["pat_str"],
        mergeable_ranks=ranks,
        special_tokens=SPECIAL_JSON["special_tokens"],
    )


def test_basics(llama3):
    assert isinstance(llama3, TiktokenTokenizer)
    assert (llama3.kind, llama3.vocab_size) == ("tiktoken", 128256)
    assert (llama3.bos_id, llama3.eos_id) == (SPECIAL_JSON["bos_id"], SPECIAL_JSON["eos_id"])
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    # Llama 3's stop tokens, plus 3.1's <|eom_id|> (the same id Llama 3 calls reserved_4).
    assert llama3.stop_ids == frozenset(SPECIAL_JSON["stop_tokens"]) | {128008}
    assert llama3.special_token_id("<|eom_id|>") == 128008
    assert llama3.encode("<|python_tag|>x", allow_special=True)[0] == 128010
    assert not llama3.strips_leading_space
    assert llama3.encode("Hello world") == [9906, 1917]


def test_special_tokens_match_meta_table(llama3):
    assert SPECIAL_JSON["pat_str"] == PAT_STR
    table = SPECIAL_JSON["special_tokens"]
    assert len(SPECIAL_TOKENS) == SPECIAL_JSON["num_reserved_special_tokens"] == 256
    ids = range(SPECIAL_JSON["num_base_tokens"], 128256)
    assert dict(zip(SPECIAL_TOKENS, ids, strict=True)) == table
    assert all(llama3.special_token_id(name) == i for name, i in table.items())
    assert llama3.special_token_id("Hello") is None


def test_ggml_cases_encode(llama3, bpe_cases):
    assert len(bpe_cases) == 46
    wrong = [(text, ids) for text, ids in bpe_cases if llama3.encode(text) != ids]
    assert not wrong
    for text, ids in bpe_cases:
        assert llama3.decode(ids) == text


def test_allow_special(llama3):
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert llama3.encode(text, allow_special=True) == [128006, 882, 128007, 271, 6151, 128009]
    plain = llama3.encode(text)
    assert not set(plain) & set(range(128000, 128256))
    assert llama3.decode(plain) == text
    assert llama3.encode("x", bos=True, eos=True) == [128000, 87, 128001]


def test_token_bytes(llama3):
    assert llama3.token_bytes(9906) == b"Hello"
    assert llama3.token_bytes(128009) == b"<|eot_id|>"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 255), st.integers(0, 128255)), max_size=30))
def test_decode_is_tiktoken_decode(llama3, reference, ids):
    assert llama3.decode(ids) == reference.decode(ids)


def test_long_inputs_are_split_but_roundtrip(llama3):
    text = "a" * 60_000 + " " * 30_000 + "b c " * 1000
    ids = llama3.encode(text)
    assert llama3.decode(ids) == text


def meta_split(s: str, max_len: int) -> list[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`, verbatim in behaviour."""
    out, cur_len, slice_start = [], 0, 0
    cur_space = s[0].isspace() if s else False
    for i in range(len(s)):
        now_space = s[i].isspace()
        if cur_space ^ now_space:
            cur_len, cur_space = 1, now_space
        else:
            cur_len += 1
            if cur_len > max_len:
                out.append(s[slice_start:i])
                slice_start, cur_len = i, 1
    out.append(s[slice_start:])
    return out


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\n\u3000ab\u00e9", max_size=60), st.integers(1, 6))
def test_split_long_runs_matches_meta(text, max_run):
    assert list(split_long_runs(text, max_run)) == meta_split(text, max_run)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_encode_matches_plain_tiktoken(llama3, reference, text):
    # Llama 3.1's names for reserved ids are specials to us, plain text to Llama 3's tiktoken.
    assume(not any(name in text for name in LLAMA31_NAMES))
    assert llama3.encode(text) == reference.encode(text, disallowed_special=())
    with_specials = f"<|begin_of_text|>{text}<|eot_id|>"
    assert llama3.encode(with_specials, allow_special=True) == reference.encode(
        with_specials, allowed_special="all"
    )
