"""StreamDecoder: streamed text equals a full decode and never splits a character."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from torchchat.tokenizer import StreamDecoder


def stream(tok, ids, prev_token=None) -> list[str]:
    decoder = StreamDecoder(tok, prev_token)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def check(tok, ids, prev_token=None) -> None:
    chunks = stream(tok, ids, prev_token)
    assert "".join(chunks) == tok.decode(ids)
    raw = b"".join(tok.token_bytes(i) for i in ids)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert not any("\ufffd" in c for c in chunks)


# Byte-fallback ids (3..258) often, so multi-byte characters get split across tokens.
LLAMA2_IDS = st.lists(st.one_of(st.integers(3, 258), st.integers(0, 31999)), max_size=40)
# Ids 0..255 of Llama 3 are single bytes.
LLAMA3_IDS = st.lists(st.one_of(st.integers(0, 255), st.integers(0, 128255)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(LLAMA2_IDS, st.sampled_from([None, 1]))
def test_sentencepiece_stream(llama2, ids, prev_token):
    check(llama2, ids, prev_token)


@settings(max_examples=300, deadline=None)
@given(LLAMA3_IDS, st.sampled_from([None, 128000]))
def test_tiktoken_stream(llama3, ids, prev_token):
    check(llama3, ids, prev_token)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hf_stream(hf_llama2, hf_bytelevel, data):
    check(hf_llama2, data.draw(LLAMA2_IDS), data.draw(st.sampled_from([None, 1])))
    ids = st.lists(st.integers(0, hf_bytelevel.vocab_size - 1), max_size=40)
    check(hf_bytelevel, data.draw(ids))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_valid_text_streams_without_replacement_chars(llama2, llama3, hf_bytelevel, text):
    for tok in (llama2, llama3, hf_bytelevel):
        ids = tok.encode(text)
        chunks = stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)


def test_mid_sequence_keeps_leading_space(llama2):
    hello = llama2.encode("Hello")  # "▁Hello"
    assert "".join(stream(llama2, hello, prev_token=None)) == "Hello"
    assert "".join(stream(llama2, hello, prev_token=1)) == "Hello"
    assert "".join(stream(llama2, hello, prev_token=29889)) == " Hello"
    # BOS itself contributes no bytes, so the space after it is still the first one.
    assert "".join(stream(llama2, [1, *hello])) == "Hello"


def test_three_byte_character_waits_until_complete(llama2):
    euro = [3 + b for b in "€".encode()]  # <0xE2> <0x82> <0xAC>
    decoder = StreamDecoder(llama2, prev_token=29889)
    assert [decoder.push(i) for i in euro] == ["", "", "€"]
    assert decoder.flush() == ""


def test_flush_replaces_an_unfinished_character(llama2):
    decoder = StreamDecoder(llama2)
    assert decoder.push(3 + 0xE2) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(15043) == " Hello"  # reusable after flush, mid-sequence now
