"""SentencePieceTokenizer against llama.cpp's test cases and sentencepiece itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchchat.errors import TorchchatError
from torchchat.tokenizer import SentencePieceTokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"


def test_llama2_basics(llama2):
    assert isinstance(llama2, SentencePieceTokenizer)
    assert (llama2.kind, llama2.vocab_size) == ("sentencepiece", 32000)
    assert (llama2.bos_id, llama2.eos_id, llama2.bos_token, llama2.eos_token) == (
        1,
        2,
        "<s>",
        "</s>",
    )
    assert llama2.stop_ids == frozenset({2})
    assert llama2.strips_leading_space
    expected = [15043, 3186, 29991, 9038, 2501, 263, 931]
    assert llama2.encode("Hello world! Once upon a time") == expected


def test_stories_tokenizer_loads():
    tok = load_tokenizer(SHARED / "stories260K" / "tok512.model")
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 512, 1, 2)
    assert tok.decode(tok.encode("Once upon a time", bos=True)) == "Once upon a time"


def test_ggml_cases_encode(llama2, spm_cases):
    assert len(spm_cases) == 46
    wrong = [(text, ids) for text, ids in spm_cases if llama2.encode(text) != ids]
    assert not wrong


def test_ggml_cases_decode_like_sentencepiece(llama2, sp_llama2, spm_cases):
    for text, ids in spm_cases:
        assert llama2.decode(ids) == sp_llama2.decode(ids), text
        assert llama2.decode([1, *ids, 2]) == sp_llama2.decode([1, *ids, 2]), text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_decode_matches_sentencepiece_on_valid_text(llama2, sp_llama2, text):
    ids = llama2.encode(text, bos=True)
    assert llama2.decode(ids) == sp_llama2.decode(ids)


def test_bos_eos_flags(llama2):
    assert llama2.encode("Hi", bos=True, eos=True) == [1, *llama2.encode("Hi"), 2]
    assert llama2.encode("") == []
    assert llama2.encode("", bos=True) == [1]


def test_allow_special_matches_meta_llama2_chat_encoding(llama2, sp_llama2):
    text = "<s>[INST] hi [/INST] yo </s><s>[INST] q [/INST]"
    # Meta's chat_completion: each exchange is its own encode(bos=True, eos=True) call.
    first, second = sp_llama2.encode("[INST] hi [/INST] yo "), sp_llama2.encode("[INST] q [/INST]")
    meta = [1, *first, 2, 1, *second]
    assert llama2.encode(text, allow_special=True) == meta
    assert llama2.encode("<s>", allow_special=False) == sp_llama2.encode("<s>")
    assert 1 not in llama2.encode(text)


def test_token_bytes(llama2):
    assert llama2.token_bytes(1) == b"" and llama2.token_bytes(2) == b""
    assert llama2.token_bytes(0) == " \u2047 ".encode()
    assert llama2.token_bytes(3 + 0xE2) == b"\xe2"
    assert llama2.token_bytes(13) == b"\n"  # <0x0A>
    assert llama2.token_bytes(15043) == b" Hello"
    assert llama2.token_bytes(29871) == b" "
    with pytest.raises(IndexError):
        llama2.token_bytes(32000)
    # past the vocabulary: the user's error (a tokenizer not the model's), shown as one line
    with pytest.raises(TorchchatError, match="outside the tokenizer's 32000 tokens"):
        llama2.token_bytes(40000)


def test_decode_strips_one_leading_space(llama2):
    assert llama2.decode([29871, 15043]) == " Hello"
    assert llama2.decode([1, 15043]) == "Hello"
    assert llama2.decode([15043, 2, 1, 15043]) == "Hello Hello"
    # An invalid byte sequence decodes like Python's "replace" handler.
    assert llama2.decode([3 + 0xE2, 3 + 0x82, 15043]) == "\ufffd Hello"


def test_special_token_id(llama2):
    assert llama2.special_token_id("<s>") == 1
    assert llama2.special_token_id("</s>") == 2
    assert llama2.special_token_id("<unk>") is None
    assert llama2.special_token_id("Hello") is None
