"""Chat prompt formats: Meta's Llama 2 and Llama 3, ChatML, and Hugging Face jinja templates.

A template renders messages to text that spells special tokens out (e.g. "<s>"). `render_spans`
also says where each message's own text lies in it, so `tokenizer.encode_prompt(text, spans)`
turns the template's special-token strings into control tokens but leaves any a user typed as
text (no extra BOS).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from torchchat.errors import TorchchatError, one_line
from torchchat.tokenizer.base import Tokenizer

Message = dict[str, str]
Span = tuple[int, int]  # [start, end) of a message's text in a rendered prompt

# Private-use characters that mark where message text starts and ends in a trial rendering.
_OPEN, _CLOSE = "\ue000", "\ue001"

TEMPLATE_NAMES = ("chatml", "hf", "llama2", "llama3")


class ChatTemplate(ABC):
    """Turns a list of {"role", "content"} messages into prompt text."""

    name: str

    @abstractmethod
    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Prompt text for messages, ending with the assistant's turn opener if asked."""


class Llama2Template(ChatTemplate):
    """Meta's Llama 2 chat format, as built by `chat_completion` in meta-llama/llama."""

    name = "llama2"

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """`<s>[INST] user [/INST] answer </s>` per exchange; the format has no separate opener."""
        dialog = list(messages)
        if dialog and dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise TorchchatError("llama2 chat format needs a user message after the system")
            # Meta folds the system prompt into the first user message, then strips the whole.
            merged = f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n{dialog[1]['content']}"
            dialog = [{"role": dialog[1]["role"], "content": merged}, *dialog[2:]]
        expected = ("user", "assistant")
        if any(m["role"] != expected[i % 2] for i, m in enumerate(dialog)):
            raise TorchchatError(
                "llama2 chat format needs user and assistant messages alternating, user first"
            )
        text = "".join(
            f"<s>[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} </s>"
            for user, answer in zip(dialog[::2], dialog[1::2], strict=False)
        )
        if len(dialog) % 2:
            text += f"<s>[INST] {dialog[-1]['content'].strip()} [/INST]"
        return text


class Llama3Template(ChatTemplate):
    """Meta's Llama 3 chat format (`ChatFormat.encode_dialog_prompt` in meta-llama/llama3)."""

    name = "llama3"

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """`<|begin_of_text|>`, a header + stripped content + `<|eot_id|>` per message."""
        text = "<|begin_of_text|>" + "".join(
            f"{_llama3_header(m['role'])}{m['content'].strip()}<|eot_id|>" for m in messages
        )
        if add_generation_prompt:
            text += _llama3_header("assistant")
        return text


def _llama3_header(role: str) -> str:
    """The Llama 3 message header for role."""
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


class ChatMLTemplate(ChatTemplate):
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message."""

    name = "chatml"

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """ChatML text; content is used verbatim."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text


class HFChatTemplate(ChatTemplate):
    """A Hugging Face jinja `chat_template`, rendered only inside jinja's immutable sandbox."""

    name = "hf"

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        # The template comes from a downloaded model folder: treat it as untrusted code.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TorchchatError(f"chat template does not compile: {one_line(e)}") from e

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Render with the variables HF templates expect; any failure is a TorchchatError."""
        try:
            return self._template.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except TorchchatError:
            raise
        except Exception as e:  # template code can fail in any way; report it, don't crash
            raise TorchchatError(f"chat template failed: {one_line(e)}") from e


def _raise_exception(message: Any) -> None:
    """The `raise_exception` global HF templates call to reject a conversation."""
    reason = " ".join(str(message).split())
    raise TorchchatError(f"chat template rejected the conversation: {reason}")


def _strftime_now(fmt: str) -> str:
    """The `strftime_now` global (Llama 3.1+ templates print today's date)."""
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    """Like transformers' tojson: real JSON, no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


_BUILTINS: dict[str, type[ChatTemplate]] = {
    "llama2": Llama2Template,
    "llama3": Llama3Template,
    "chatml": ChatMLTemplate,
}


def choose_template(
    name: str | None, tokenizer: Tokenizer, hf_chat_template: str | None
) -> ChatTemplate:
    """The named template, else the model's HF template, else the one the tokenizer implies."""
    if name is not None:
        if name in _BUILTINS:
            return _BUILTINS[name]()
        if name == "hf":
            if hf_chat_template is None:
                raise TorchchatError(
                    "chat template 'hf' needs a chat_template in tokenizer_config.json "
                    "next to tokenizer.json"
                )
            return HFChatTemplate(hf_chat_template, tokenizer.bos_token, tokenizer.eos_token)
        raise TorchchatError(
            f"unknown chat template {name!r}: choose one of {', '.join(TEMPLATE_NAMES)}"
        )
    if hf_chat_template is not None:
        return HFChatTemplate(hf_chat_template, tokenizer.bos_token, tokenizer.eos_token)
    if (
        tokenizer.kind == "tiktoken"
        or tokenizer.special_token_id("<|start_header_id|>") is not None
    ):
        return Llama3Template()
    if tokenizer.special_token_id("<|im_start|>") is not None:
        return ChatMLTemplate()
    return Llama2Template()


def render_spans(
    template: ChatTemplate, messages: list[Message], add_generation_prompt: bool = True
) -> tuple[str, list[Span]]:
    """The rendered prompt and the spans of message text in it.

    The template renders a second time with each content wrapped in marker characters; the
    text between markers is then found in the real rendering, as is or stripped (formats strip
    content), with everything outside the markers identical. A template that transforms content
    in other ways gets no spans (its special-token strings are then all read as control tokens,
    as Hugging Face and llama.cpp do). The two marker characters are dropped from messages.
    """
    messages = [
        {**m, "content": m["content"].replace(_OPEN, "").replace(_CLOSE, "")} for m in messages
    ]
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    marked = [{**m, "content": _OPEN + m["content"] + _CLOSE} for m in messages]
    try:
        segments = _segments(template.render(marked, add_generation_prompt=add_generation_prompt))
    except TorchchatError:
        return text, []
    spans = _align(text, segments) if segments is not None else None
    return text, spans or []


def _segments(marked: str) -> list[str] | None:
    """[outside, inside, outside, ..., outside] around the markers; None if they do not pair up."""
    parts = [marked]
    while (i := parts[-1].find(_OPEN)) >= 0:
        rest = parts.pop()
        inner, sep, after = rest[i + 1 :].partition(_CLOSE)
        if _CLOSE in rest[:i] or not sep or _OPEN in inner:
            return None
        parts += [rest[:i], inner, after]
    return None if _CLOSE in parts[-1] else parts


def _align(text: str, segments: list[str]) -> list[Span] | None:
    """Where each inside segment (as is, or stripped on either side) lies in text."""
    spans, cur = [], 0
    for k in range(0, len(segments) - 1, 2):
        outside, inside, after = segments[k], segments[k + 1], segments[k + 2]
        if not text.startswith(outside, cur):
            return None
        cur += len(outside)
        variants = dict.fromkeys((inside, inside.strip(), inside.rstrip(), inside.lstrip()))
        found = next((v for v in variants if text.startswith(v + after, cur)), None)
        if found is None:
            return None
        spans.append((cur, cur + len(found)))
        cur += len(found)
    return spans if text[cur:] == segments[-1] else None


def tail_spans(spans: list[Span], text_len: int, tail_len: int) -> list[Span]:
    """The spans, shifted to index the last tail_len characters of a text_len-long text."""
    start = text_len - tail_len
    return [(max(a - start, 0), b - start) for a, b in spans if b > start]


def new_turn_text(
    template: ChatTemplate,
    history: list[Message],
    assistant_reply: str,
    new_messages: list[Message],
) -> str | None:
    """Text to feed after a cached prompt and reply so the cache matches a full re-render.

    The KV cache holds `render(history)` plus the reply's tokens (without its end marker).
    Returns what follows the reply in `render(history + [reply, *new_messages])`, or None
    when the template does not render that conversation as an extension of the cached one.
    """
    prefix = template.render(history, add_generation_prompt=True)
    reply = {"role": "assistant", "content": assistant_reply}
    full = template.render([*history, reply, *new_messages], add_generation_prompt=True)
    if not full.startswith(prefix):
        return None
    rest = full[len(prefix) :].lstrip()
    body = assistant_reply.strip()
    if not rest.startswith(body):
        return None
    return rest[len(body) :]
