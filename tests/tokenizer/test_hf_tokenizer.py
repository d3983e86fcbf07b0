"""HFTokenizer on tokenizer.json files built in tmp: agreement with the tokenizers library."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFLib

from torchchat.errors import TorchchatError
from torchchat.tokenizer import HFTokenizer, load_tokenizer
from torchchat.tokenizer.hf import _decoder_style


def library(folder, name="tokenizer.json") -> HFLib:
    return HFLib.from_file(str(folder / name))


@pytest.fixture(scope="module")
def libs(hf_llama2, hf_bytelevel, hf_llama2_dir, hf_bytelevel_dir):
    """(our tokenizer, the tokenizers library on the same file) pairs, specials matched as text."""
    pairs = [
        (hf_llama2, library(hf_llama2_dir, "vocab.data")),
        (hf_bytelevel, library(hf_bytelevel_dir)),
    ]
    for _, lib in pairs:
        lib.encode_special_tokens = True
    return pairs


def test_content_detection_and_config(hf_llama2, hf_llama2_dir):
    assert isinstance(hf_llama2, HFTokenizer)
    assert hf_llama2.kind == "hf"
    assert (hf_llama2.bos_id, hf_llama2.eos_id) == (1, 2)
    assert (hf_llama2.bos_token, hf_llama2.eos_token) == ("<s>", "</s>")
    assert hf_llama2.stop_ids == frozenset({2})
    assert hf_llama2.vocab_size == 32000
    assert hf_llama2.strips_leading_space
    assert hf_llama2.chat_template.startswith("{{ bos_token }}")
    # A folder without tokenizer.json/tokenizer.model is not searched for odd names.
    with pytest.raises(TorchchatError, match="tokenizer not found in"):
        load_tokenizer(hf_llama2_dir)


def test_llama2_hf_matches_sentencepiece(hf_llama2, llama2, spm_cases):
    for text, ids in spm_cases:
        assert hf_llama2.encode(text) == ids, text
        assert hf_llama2.decode(ids) == llama2.decode(ids), text
    chat = "<s>[INST] hi [/INST] yo </s><s>[INST] q [/INST]"
    assert hf_llama2.encode(chat, allow_special=True) == llama2.encode(chat, allow_special=True)
    assert hf_llama2.encode(chat) == llama2.encode(chat)
    # Same pieces, so the same bytes for every ordinary token.
    assert all(hf_llama2.token_bytes(i) == llama2.token_bytes(i) for i in range(3, 32000))


def test_encode_skips_post_processor(hf_llama2, hf_bytelevel, hf_llama2_dir, hf_bytelevel_dir):
    lib = library(hf_llama2_dir, "vocab.data")
    assert lib.encode("Hello").ids[0] == 1  # the post-processor would add BOS
    assert hf_llama2.encode("Hello") == lib.encode("Hello", add_special_tokens=False).ids
    assert hf_llama2.encode("Hello", bos=True, eos=True) == [1, *hf_llama2.encode("Hello"), 2]
    blib = library(hf_bytelevel_dir)
    assert blib.encode("Hello").ids[-1] == hf_bytelevel.special_token_id("<|endoftext|>")
    assert hf_bytelevel.encode("Hello") == blib.encode("Hello", add_special_tokens=False).ids


def test_bytelevel_names_and_stops(hf_bytelevel):
    assert hf_bytelevel.bos_id is None and hf_bytelevel.bos_token is None
    endoftext = hf_bytelevel.special_token_id("<|endoftext|>")
    im_end = hf_bytelevel.special_token_id("<|im_end|>")
    assert hf_bytelevel.eos_id == endoftext
    assert hf_bytelevel.stop_ids == frozenset({endoftext, im_end})
    assert not hf_bytelevel.strips_leading_space
    assert hf_bytelevel.chat_template is None


def test_allow_special(hf_bytelevel):
    im_start = hf_bytelevel.special_token_id("<|im_start|>")
    assert hf_bytelevel.encode("<|im_start|>user", allow_special=True)[0] == im_start
    plain = hf_bytelevel.encode("<|im_start|>user")
    assert im_start not in plain
    assert hf_bytelevel.decode(plain) == "<|im_start|>user"
    # Special tokens vanish on decode; non-special added tokens are text.
    ids = hf_bytelevel.encode("<|im_start|>hi <tool>", allow_special=True)
    assert hf_bytelevel.decode(ids) == "hi <tool>"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_decode_and_token_bytes_agree_with_library(libs, text):
    for tok, lib in libs:
        ids = tok.encode(text)
        assert ids == lib.encode(text, add_special_tokens=False).ids
        expected = lib.decode(ids)
        assert tok.decode(ids) == expected
        joined = b"".join(tok.token_bytes(i) for i in ids).decode()
        if tok.strips_leading_space:
            joined = joined.removeprefix(" ")
        assert joined == expected


def test_bytelevel_token_bytes_match_library(hf_bytelevel, hf_bytelevel_dir):
    lib = library(hf_bytelevel_dir)
    for i in range(hf_bytelevel.vocab_size):
        raw = hf_bytelevel.token_bytes(i)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            continue  # a lone partial character: the library would print U+FFFD
        assert lib.decode([i]) == text, i


def test_generation_config_adds_stop_ids(tmp_path, hf_bytelevel_dir):
    (tmp_path / "tokenizer.json").write_bytes((hf_bytelevel_dir / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    templates = [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "T"}]
    config = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": templates}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None
    assert {5, 7} <= tok.stop_ids
    assert tok.chat_template == "T"


def test_decoder_styles():
    assert _decoder_style({"type": "ByteLevel"}) == ("bytelevel", False)
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}
    assert _decoder_style(metaspace) == ("sentencepiece", True)
    assert _decoder_style({**metaspace, "prepend_scheme": "never"}) == ("sentencepiece", False)
    assert _decoder_style({"type": "WordPiece", "prefix": "##"}) == ("library", False)
    assert _decoder_style(None) == ("library", False)
    strip_first = {
        "type": "Sequence",
        "decoders": [{"type": "Strip", "content": " ", "start": 1, "stop": 0}, {"type": "Fuse"}],
    }
    assert _decoder_style(strip_first) == ("library", False)


def test_bad_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ')
    with pytest.raises(TorchchatError, match="invalid JSON"):
        load_tokenizer(bad)
    bad.write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(TorchchatError, match="cannot read tokenizer") as info:
        load_tokenizer(bad)
    assert "\n" not in str(info.value)


def test_adds_bos_follows_the_post_processor(hf_llama2, hf_bytelevel, llama2, tmp_path):
    """Whether a document's encoding starts with BOS (eval, as lm-eval's HF backend encodes):
    tokenizer.json's TemplateProcessing decides; sentencepiece Llama tokenizers always do."""
    from tests.tokenizer.conftest import LLAMA2_MODEL, llama2_hf_json
    from torchchat.tokenizer import load_tokenizer

    assert hf_llama2.adds_bos and llama2.adds_bos
    assert not hf_bytelevel.adds_bos  # no BOS at all
    lib = llama2_hf_json(LLAMA2_MODEL)
    lib.post_processor = None  # the same vocabulary, no template: no BOS added
    lib.save(str(tmp_path / "tokenizer.json"))
    plain = load_tokenizer(tmp_path / "tokenizer.json")
    assert plain.bos_id == 1 and not plain.adds_bos
