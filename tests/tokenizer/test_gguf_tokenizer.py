"""Tokenizers from GGUF metadata alone: llama.cpp's own test cases, SPM and Llama 3 BPE."""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFLib
from tokenizers import decoders, models, pre_tokenizers

from torchchat.chat.templates import HFChatTemplate, choose_template
from torchchat.checkpoint import load_checkpoint
from torchchat.errors import TorchchatError
from torchchat.tokenizer import HFTokenizer, SentencePieceTokenizer
from torchchat.tokenizer.gguf import gguf_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"
SPM_GGUF = SHARED / "ggml-vocab-llama-spm" / "ggml-vocab-llama-spm.gguf"
LLAMA3 = SHARED / "llama3-tokenizer"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def from_file(path: Path):
    return gguf_tokenizer(load_checkpoint(path).extra["gguf"].metadata, str(path))


@pytest.fixture(scope="module")
def spm_gguf():
    return from_file(SPM_GGUF)


def test_spm_vocab_only_file_passes_llama_cpps_cases(spm_gguf, spm_cases, llama2):
    assert isinstance(spm_gguf, SentencePieceTokenizer) and spm_gguf.vocab_size == 32000
    assert (spm_gguf.bos_id, spm_gguf.eos_id, spm_gguf.stop_ids) == (1, 2, frozenset({2}))
    assert (spm_gguf.bos_token, spm_gguf.eos_token) == ("<s>", "</s>")
    assert len(spm_cases) == 46
    for text, ids in spm_cases:
        assert spm_gguf.encode(text) == ids == llama2.encode(text), text
        assert spm_gguf.decode(ids) == llama2.decode(ids), text
    assert all(spm_gguf.token_bytes(i) == llama2.token_bytes(i) for i in range(32000))
    chat = "<s>[INST] hi [/INST] yo </s><s>[INST] q [/INST]"
    assert spm_gguf.encode(chat, allow_special=True) == llama2.encode(chat, allow_special=True)
    assert spm_gguf.chat_template is None


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(max_size=40))
def test_spm_gguf_encodes_like_the_llama2_model_file(spm_gguf, llama2, text):
    assert spm_gguf.encode(text, bos=True) == llama2.encode(text, bos=True)


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes (the alphabet of byte-level BPE tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    mapping, shift = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def unicode_token(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def llama3_vocab_and_merges() -> tuple[list[str], list[str]]:
    """tiktoken ranks as GPT-2-style tokens and merges (transformers' TikTokenConverter, compactly)."""
    lines = (LLAMA3 / "tokenizer.model").read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}  # fmt: skip
    merges = []
    for token, rank in ranks.items():
        # Every split of a token into two ranked pieces is a merge, ordered by the pieces' ranks.
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = sorted((p for p in pairs if p[0] in ranks and p[1] in ranks), key=lambda p: (ranks[p[0]], ranks[p[1]]))  # fmt: skip
        merges += [(rank, left, right) for left, right in pairs]
    merges.sort(key=lambda m: m[0])
    tokens = [unicode_token(t) for t, _ in sorted(ranks.items(), key=lambda item: item[1])]
    return tokens, [f"{unicode_token(left)} {unicode_token(right)}" for _, left, right in merges]


@pytest.fixture(scope="module")
def llama3_gguf_path(tmp_path_factory) -> Path:
    """A vocab-only GGUF of the Llama 3 tokenizer, written by gguf.GGUFWriter like llama.cpp's."""
    specials = json.loads((LLAMA3 / "special_tokens.json").read_text())["special_tokens"]
    tokens, merges = llama3_vocab_and_merges()
    tokens += sorted(specials, key=specials.get)
    path = tmp_path_factory.mktemp("llama3") / "ggml-vocab-llama-bpe.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for key, value in {"block_count": 1, "context_length": 8192, "embedding_length": 4096,
                       "feed_forward_length": 14336, "attention.head_count": 32}.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * 128000 + [3] * 256)
    w.add_token_merges(merges)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128001)
    w.add_eot_token_id(128009)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def llama3_gguf(llama3_gguf_path):
    return from_file(llama3_gguf_path)


def test_llama3_bpe_from_gguf_passes_llama_cpps_cases(llama3_gguf, bpe_cases, llama3):
    assert isinstance(llama3_gguf, HFTokenizer) and llama3_gguf.vocab_size == 128256
    assert (llama3_gguf.bos_id, llama3_gguf.eos_id) == (128000, 128001)
    assert llama3_gguf.stop_ids == frozenset({128001, 128009})
    assert llama3_gguf.bos_token == "<|begin_of_text|>"
    assert len(bpe_cases) == 46
    for text, ids in bpe_cases:
        assert llama3_gguf.encode(text) == ids == llama3.encode(text), text
        assert llama3_gguf.decode(ids) == llama3.decode(ids), text


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(max_size=40))
def test_llama3_gguf_encodes_like_tiktoken(llama3_gguf, llama3, text):
    assert llama3_gguf.encode(text) == llama3.encode(text)
    special = f"<|begin_of_text|>{text}<|eot_id|>"
    # The message text is a literal span: special-token strings typed in it stay text.
    span = [(len("<|begin_of_text|>"), len("<|begin_of_text|>") + len(text))]
    expected = [128000, *llama3.encode(text), 128009]
    assert (
        llama3_gguf.encode_prompt(special, span) == expected == llama3.encode_prompt(special, span)
    )


def test_llama3_specials_and_chat_template(llama3_gguf):
    assert llama3_gguf.encode("<|eot_id|>") != [128009]  # plain text unless allowed
    assert llama3_gguf.decode([128000, 9906, 1917, 128009]) == "Hello world"
    assert llama3_gguf.chat_template == CHAT_TEMPLATE
    template = choose_template(None, llama3_gguf, llama3_gguf.chat_template)
    assert isinstance(template, HFChatTemplate)
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    )
    ids = llama3_gguf.encode(text, allow_special=True)
    assert ids[:2] == [128000, 128006] and ids[-1] == 271  # "\n\n"


def gpt2_reference(meta) -> HFLib:
    """The same vocabulary with the tokenizers library's own GPT-2 byte-level pre-tokenizer."""
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    lib = HFLib(models.BPE(vocab, merges))
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lib.decoder = decoders.ByteLevel()
    return lib


def test_gpt2_and_default_pre_tokenizers(llama3_gguf_path, bpe_cases):
    meta = dict(load_checkpoint(llama3_gguf_path).extra["gguf"].metadata)
    meta["tokenizer.ggml.pre"] = "gpt2"
    gpt2 = gguf_tokenizer(meta, "x.gguf")
    reference = gpt2_reference(meta)
    for text, _ in bpe_cases:
        assert gpt2.encode(text) == reference.encode(text).ids, text
    # llama.cpp's "default" splits off punctuation runs, then numbers, then threes of digits.
    meta["tokenizer.ggml.pre"] = "default"
    default = gguf_tokenizer(meta, "x.gguf")
    assert [default.decode([i]) for i in default.encode("a 1234!!")] == ["a", " ", "123", "4", "!!"]
    meta["tokenizer.ggml.pre"] = "qwen2"
    with pytest.raises(
        TorchchatError, match=r"x.gguf: GGUF tokenizer.ggml.pre: 'qwen2' is not supported"
    ):
        gguf_tokenizer(meta, "x.gguf")
    meta["tokenizer.ggml.pre"] = "llama-bpe"
    for merges in (["a b c"], ["a"], ["a x\u0100"], ["Ċ q"], ["a "]):  # "Ċq" is not a token
        meta["tokenizer.ggml.merges"] = [*merges, "Ġ t"]
        with pytest.raises(TorchchatError, match="GGUF tokenizer.ggml.merges: merge 0 "):
            gguf_tokenizer(meta, "x.gguf")


def test_spm_add_space_prefix_and_stop_tokens(spm_gguf):
    meta = dict(load_checkpoint(SPM_GGUF).extra["gguf"].metadata)
    meta["tokenizer.ggml.add_space_prefix"] = False
    meta["tokenizer.ggml.eot_token_id"] = 32
    tok = gguf_tokenizer(meta, "x.gguf")
    assert tok.encode("Hello") == [10994]  # "Hello"
    assert spm_gguf.encode("Hello") == [15043]  # "▁Hello"
    assert not tok.strips_leading_space and tok.decode([15043]) == " Hello"
    assert tok.stop_ids == frozenset({2, 32})
    del meta["tokenizer.ggml.tokens"]
    with pytest.raises(
        TorchchatError, match="GGUF tokenizer.ggml.tokens: the file has no vocabulary"
    ):
        gguf_tokenizer(meta, "x.gguf")
