"""Hugging Face `tokenizer.json` tokenizers via the `tokenizers` library."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFLibTokenizer

from torchchat.errors import TorchchatError, one_line
from torchchat.tokenizer.base import (
    Tokenizer,
    TokenOutOfRange,
    join_token_bytes,
    stop_ids_for,
)

# Fallback names when there is no tokenizer_config.json to say which tokens are BOS/EOS.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>")

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer(Tokenizer):
    """A `tokenizer.json`, with BOS/EOS and chat template from an adjacent tokenizer_config.json."""

    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        text, spec = _read_json(self.path, "tokenizer")
        if "model" not in spec:
            raise TorchchatError(
                f"cannot read tokenizer {self.path}: JSON without a 'model' key is not a tokenizer.json"
            )
        try:
            tok = HFLibTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception
            raise TorchchatError(f"cannot read tokenizer {self.path}: {one_line(e)}") from e
        added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        config = _read_optional_json(self.path.parent / "tokenizer_config.json")
        # Llama 3.x instruct lists extra stop tokens (e.g. <|eom_id|>) only in generation_config.
        generation = _read_optional_json(self.path.parent / "generation_config.json")
        extra = generation.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [extra]
        self._setup(
            tok,
            spec.get("decoder"),
            bos_token=_config_token(config, "bos_token", BOS_NAMES, added),
            eos_token=_config_token(config, "eos_token", EOS_NAMES, added),
            chat_template=_chat_template(config, self.path.parent),
            extra_stop_ids=[i for i in extra if isinstance(i, int)],
        )

    @classmethod
    def from_library(
        cls,
        tok: HFLibTokenizer,
        source: str,
        *,
        bos_id: int | None,
        eos_id: int | None,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> HFTokenizer:
        """Wrap a `tokenizers.Tokenizer` built in memory (e.g. from GGUF metadata)."""
        self = cls.__new__(cls)
        self.path = Path(source)
        decoder = json.loads(tok.decoder.__getstate__()) if tok.decoder is not None else None
        self._setup(
            tok,
            decoder,
            bos_token=tok.id_to_token(bos_id) if bos_id is not None else None,
            eos_token=tok.id_to_token(eos_id) if eos_id is not None else None,
            chat_template=chat_template,
            extra_stop_ids=extra_stop_ids,
        )
        return self

    def _setup(
        self,
        tok: HFLibTokenizer,
        decoder: dict[str, Any] | None,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        extra_stop_ids: Iterable[int],
    ) -> None:
        self._tok = tok
        # encode_special_tokens is state on the shared library object; the server encodes in threads.
        self._encode_lock = threading.Lock()
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in added.items()}
        # Special added tokens vanish on decode, as in tokenizers' skip_special_tokens=True.
        self._skipped = frozenset(i for i, t in added.items() if t.special)
        self._style, self.strips_leading_space = _decoder_style(decoder)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self.stop_ids = stop_ids_for(self.eos_id, self._added) | frozenset(extra_stop_ids)

    @property
    def adds_bos(self) -> bool:
        """tokenizer.json's post-processor decides (TemplateProcessing with BOS or not), as it
        does in transformers."""
        if self.bos_id is None:
            return False
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        return with_specials[:1] == [self.bos_id] != plain[:1]

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids without the tokenizer's own post-processor specials."""
        with self._encode_lock:
            # With encode_special_tokens set, added special tokens are matched as plain text.
            self._tok.encode_special_tokens = not allow_special
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Full decode; the tokenizers library decides when the decoder is not understood."""
        if self._style == "library":
            return self._tok.decode(list(ids), skip_special_tokens=True)
        return join_token_bytes(self, ids)

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes per the tokenizer.json decoder: ByteLevel, sentencepiece-like, or the library."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise TokenOutOfRange(token_id, self.vocab_size)
        if token_id in self._skipped:
            return b""
        if self._style == "bytelevel":
            return _byte_level_bytes(token)
        if self._style in ("sentencepiece", "sentencepiece+bytes"):
            match = _BYTE_PIECE.fullmatch(token)
            if match and self._style == "sentencepiece+bytes":
                return bytes([int(match.group(1), 16)])
            return token.replace("\u2581", " ").encode()
        return self._tok.decode([token_id], skip_special_tokens=True).encode()

    def special_strings(self) -> list[str]:
        return [t for t, i in self._added.items() if i in self._skipped]

    def special_token_id(self, text: str) -> int | None:
        """Id of an added token such as '<|im_end|>'."""
        return self._added.get(text)


def _decoder_style(decoder: dict[str, Any] | None) -> tuple[str, bool]:
    """Classify a tokenizer.json decoder: (style, strips_leading_space)."""
    if not decoder:
        return "library", False
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    types = [step.get("type") for step in steps]
    if types and all(t == "ByteLevel" for t in types):
        return "bytelevel", False
    strips = False
    spaces = False
    for i, step in enumerate(steps):
        kind = step.get("type")
        if (
            kind == "Replace"
            and step.get("pattern") == {"String": "\u2581"}
            and step.get("content") == " "
        ):
            spaces = True
        elif kind == "Metaspace" and step.get("replacement") == "\u2581":
            spaces = True
            scheme = step.get(
                "prepend_scheme", "always" if step.get("add_prefix_space") else "never"
            )
            strips = strips or scheme != "never"
        elif kind == "Strip" and step.get("content") == " " and step.get("stop") == 0:
            # Only a final Strip after Fuse acts on the whole text rather than on each token.
            if i != len(steps) - 1 or "Fuse" not in types or step.get("start") not in (0, 1):
                return "library", False
            strips = strips or step.get("start") == 1
        elif kind not in ("ByteFallback", "Fuse"):
            return "library", False
    if not spaces:
        return "library", False
    return ("sentencepiece+bytes" if "ByteFallback" in types else "sentencepiece"), strips


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + shift)] = b
            shift += 1
    return mapping


def _byte_level_bytes(token: str) -> bytes:
    """A ByteLevel token's bytes; like tokenizers, a token with unmapped chars is taken as UTF-8."""
    table = _unicode_to_byte()
    if all(c in table for c in token):
        return bytes(table[c] for c in token)
    return token.encode()


def _read_json(path: Path, what: str) -> tuple[str, dict[str, Any]]:
    """A JSON object file's text and value; every failure is a one-line TorchchatError."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as e:
        raise TorchchatError(f"cannot read {what} {path}: {e.strerror or one_line(e)}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TorchchatError(f"cannot read {what} {path}: invalid JSON ({one_line(e)})") from e
    if not isinstance(data, dict):
        raise TorchchatError(f"cannot read {what} {path}: expected a JSON object")
    return text, data


def _read_optional_json(path: Path) -> dict[str, Any]:
    """A companion config file next to tokenizer.json, or {} when there is none."""
    return _read_json(path, "tokenizer config")[1] if path.is_file() else {}


def _config_token(
    config: dict[str, Any], key: str, fallback_names: Sequence[str], added: dict[str, int]
) -> str | None:
    """Token text from tokenizer_config.json (str or {"content": ...}), else a well-known name."""
    if key in config:
        value = config[key]
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) and value else None
    return next((name for name in fallback_names if name in added), None)


def _chat_template(config: dict[str, Any], folder: Path) -> str | None:
    """The jinja chat template from tokenizer_config.json, or a chat_template.jinja beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: take the default one.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TorchchatError(f"cannot read chat template {jinja}: {one_line(e)}") from e
    return None
