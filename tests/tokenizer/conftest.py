"""Tokenizers for the tokenizer tests: the shared Llama 2/3 files and HF tokenizers built in tmp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFLib
from tokenizers.trainers import BpeTrainer

from tests.support import ggml_cases
from torchchat.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "models"
LLAMA2_MODEL = SHARED / "llama2c-tokenizer" / "tokenizer.model"
LLAMA3_MODEL = SHARED / "llama3-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def llama2():
    return load_tokenizer(LLAMA2_MODEL)


@pytest.fixture(scope="session")
def llama3():
    return load_tokenizer(LLAMA3_MODEL)


@pytest.fixture(scope="session")
def sp_llama2() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


def llama2_hf_json(model: Path) -> HFLib:
    """Llama 2's sentencepiece BPE rebuilt as a (legacy-style) HF tokenizer.json."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        pairs = sorted(
            (lr for lr in splits if lr[0] in vocab and lr[1] in vocab),
            key=lambda lr: (vocab[lr[0]], vocab[lr[1]]),
        )
        # sentencepiece BPE merges the pair whose result scores highest.
        ranked += [(-sp.get_score(i), i, left, right) for left, right in pairs]
    merges = [(left, right) for _, _, left, right in sorted(ranked, key=lambda m: m[:2])]
    tok = HFLib(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")]
    )
    # Like the real HF Llama tokenizer: a post-processor that adds BOS, which encode must skip.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


BYTELEVEL_CORPUS = [
    "Hello world! Once upon a time there was a little girl named Lily.",
    "She liked to play outside in the sun with her dog, a big brown dog.",
    "Résumé, naïve café; 東京は日本の首都です。 🦙🦙 emoji and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text.",
    "def f(x):\n    return x * 2  # comment\n\n\tindented\ttabs",
    "Привет мир, γειά σου κόσμε, مرحبا بالعالم, שלום עולם",
]


def bytelevel_json() -> HFLib:
    """A small GPT-2 style ByteLevel BPE with ChatML special tokens and a non-special added one."""
    tok = HFLib(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(BYTELEVEL_CORPUS * 3, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>",
        special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))],
    )
    return tok


@pytest.fixture(scope="session")
def hf_llama2_dir(tmp_path_factory) -> Path:
    """Folder with an oddly named tokenizer.json (content detection) and a tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("hf_llama2")
    llama2_hf_json(LLAMA2_MODEL).save(str(folder / "vocab.data"))
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True},
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def hf_llama2(hf_llama2_dir):
    return load_tokenizer(hf_llama2_dir / "vocab.data")


@pytest.fixture(scope="session")
def hf_bytelevel_dir(tmp_path_factory) -> Path:
    """Folder with tokenizer.json only: BOS/EOS come from well-known added-token names."""
    folder = tmp_path_factory.mktemp("hf_bytelevel")
    bytelevel_json().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def hf_bytelevel(hf_bytelevel_dir):
    return load_tokenizer(hf_bytelevel_dir)


@pytest.fixture(scope="session")
def spm_cases() -> list[tuple[str, list[int]]]:
    return ggml_cases("ggml-vocab-llama-spm", "ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="session")
def bpe_cases() -> list[tuple[str, list[int]]]:
    return ggml_cases("llama3-tokenizer", "ggml-vocab-llama-bpe.gguf")
