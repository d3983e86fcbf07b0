"""Tokenizers from GGUF metadata: `llama` vocabularies via sentencepiece, `gpt2` via tokenizers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFLibTokenizer

from torchchat.errors import TorchchatError, one_line
from torchchat.tokenizer.base import Tokenizer
from torchchat.tokenizer.hf import HFTokenizer
from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer

# llama.cpp's token types (tokenizer.ggml.token_type), the same numbers as sentencepiece's.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The regexes llama.cpp (llama-vocab.cpp) splits text with before BPE, applied in turn.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_PATTERNS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]")
# tokenizer.ggml.pre -> (patterns, ignore_merges); Llama 3 keeps a word found in the vocab whole.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "llama-bpe": ((LLAMA3_PATTERN,), True),
    "llama3": ((LLAMA3_PATTERN,), True),
    "llama-v3": ((LLAMA3_PATTERN,), True),
    "gpt2": ((GPT2_PATTERN,), False),
    "default": (_DEFAULT_PATTERNS, False),  # also what llama.cpp uses when `pre` is missing
}


def gguf_tokenizer(meta: Mapping[str, Any], source: str) -> Tokenizer:
    """The tokenizer a GGUF file's `tokenizer.*` metadata describes; source names it in errors."""
    model = meta.get("tokenizer.ggml.model")
    tokens = _string_list(meta, "tokenizer.ggml.tokens", source)
    if not tokens:
        _fail(source, "tokenizer.ggml.tokens", "the file has no vocabulary: pass --tokenizer-path")
    types = _int_list(meta, "tokenizer.ggml.token_type", source, len(tokens), default=NORMAL)
    # llama.cpp's "undefined" type (0) is plain text to its tokenizer: a normal token.
    types = [NORMAL if t == 0 else t for t in types]
    bad = next((t for t in types if not NORMAL <= t <= BYTE), None)
    if bad is not None:
        _fail(source, "tokenizer.ggml.token_type", f"unknown token type {bad}")
    if model == "llama":
        tok: Tokenizer = _sentencepiece(meta, source, tokens, types)
    elif model == "gpt2":
        tok = _byte_level_bpe(meta, source, tokens, types)
    else:
        _fail(
            source,
            "tokenizer.ggml.model",
            f"{repr(model)[:80]} is not supported (supported: llama, gpt2)",
        )
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        _fail(source, "tokenizer.chat_template", "expected a string")
    tok.chat_template = template
    return tok


def _fail(source: str, key: str, problem: str) -> NoReturn:
    raise TorchchatError(f"{source}: GGUF {key}: {problem}")


def _string_list(meta: Mapping[str, Any], key: str, source: str) -> list[str]:
    value = meta.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(source, key, "expected an array of strings")
    return value


def _int_list(meta: Mapping[str, Any], key: str, source: str, n: int, default: int) -> list[int]:
    """A per-token integer array of length n (default everywhere when absent)."""
    if key not in meta:
        return [default] * n
    value = meta[key]
    if not isinstance(value, list) or len(value) != n:
        _fail(source, key, f"expected an array of {n} values (one per token)")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        _fail(source, key, "expected integers")
    return value


def _token_id(meta: Mapping[str, Any], key: str, n: int) -> int | None:
    """An optional special-token id; llama.cpp writes 0xFFFFFFFF (or -1) for "none"."""
    value = meta.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    return None


def _special_ids(meta: Mapping[str, Any], n: int) -> tuple[int | None, int | None, list[int]]:
    """(bos, eos, extra stop ids: end-of-turn and end-of-message tokens)."""
    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", n)
    eos = _token_id(meta, "tokenizer.ggml.eos_token_id", n)
    stops = [_token_id(meta, f"tokenizer.ggml.{k}_token_id", n) for k in ("eot", "eom")]
    return bos, eos, [i for i in stops if i is not None]


def _sentencepiece(
    meta: Mapping[str, Any], source: str, tokens: list[str], types: list[int]
) -> SentencePieceTokenizer:
    """llama.cpp's SPM vocabulary as a sentencepiece BPE model, built in memory."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    if not isinstance(scores, list) or len(scores) != len(tokens):
        _fail(source, "tokenizer.ggml.scores", f"expected {len(tokens)} scores (one per token)")
    if not all(isinstance(s, float | int) and not isinstance(s, bool) for s in scores):
        _fail(source, "tokenizer.ggml.scores", "expected numbers")
    add_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(add_space, bool):
        _fail(source, "tokenizer.ggml.add_space_prefix", "expected a bool")
    bos, eos, stops = _special_ids(meta, len(tokens))

    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)  # same type numbers as llama.cpp
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    # sentencepiece reads the UNK/BOS/EOS/PAD ids from the trainer spec; -1 is "none".
    unk = _token_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens))
    spec.unk_id = (
        unk if unk is not None else next((i for i, t in enumerate(types) if t == UNKNOWN), 0)
    )
    spec.bos_id = bos if bos is not None else -1
    spec.eos_id = eos if eos is not None else -1
    spec.pad_id = -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_space
    norm.remove_extra_whitespaces = False  # llama.cpp keeps every space
    norm.escape_whitespaces = True
    try:
        return SentencePieceTokenizer.from_model_proto(
            proto.SerializeToString(),
            source,
            bos_id=bos,
            eos_id=eos,
            extra_stop_ids=stops,
            strips_leading_space=add_space,
        )
    except TorchchatError as e:
        cause = one_line(e.__cause__ or e)
        _fail(source, "tokenizer.ggml.tokens", f"sentencepiece rejects this vocabulary ({cause})")


def _byte_level_bpe(
    meta: Mapping[str, Any], source: str, tokens: list[str], types: list[int]
) -> HFTokenizer:
    """llama.cpp's `gpt2` vocabulary (byte-level BPE + merges) as a `tokenizers.Tokenizer`."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        _fail(
            source,
            "tokenizer.ggml.pre",
            f"{repr(pre)[:80]} is not supported (supported: {', '.join(PRE_TOKENIZERS)})",
        )
    patterns, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:
            _fail(source, "tokenizer.ggml.tokens", f"token {i} duplicates token {vocab[token]}")
    merges = []
    for i, merge in enumerate(_string_list(meta, "tokenizer.ggml.merges", source)):
        parts = merge.split(" ")
        # The tokenizers library panics (uncatchably) on a merge whose result is not a token.
        if len(parts) != 2 or not all(p in vocab for p in (*parts, parts[0] + parts[1])):
            problem = f"merge {i} ({merge[:80]!r}) is not two tokens that join into a token"
            _fail(source, "tokenizer.ggml.merges", problem)
        merges.append((parts[0], parts[1]))
    try:
        tok = HFLibTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        # Control tokens are matched in text only when asked (allow_special) and vanish on decode;
        # user-defined ones are always matched, like llama.cpp does.
        added = [
            (t, k) for t, k in zip(tokens, types, strict=True) if t and k in (CONTROL, USER_DEFINED)
        ]
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in added if k == CONTROL]
        )
        tok.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in added if k == USER_DEFINED]
        )
    except Exception as e:  # the Rust side raises plain Exception
        problem = f"tokenizers rejects this vocabulary ({one_line(e)})"
        raise TorchchatError(f"{source}: GGUF tokenizer.ggml.tokens/merges: {problem}") from e
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        _fail(source, "tokenizer.ggml.tokens", "special tokens do not map onto the vocabulary")
    bos, eos, stops = _special_ids(meta, len(tokens))
    return HFTokenizer.from_library(tok, source, bos_id=bos, eos_id=eos, extra_stop_ids=stops)
