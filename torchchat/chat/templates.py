"""Chat prompt formats: Meta's Llama 2 and Llama 3, ChatML, and Hugging Face jinja templates.

A template renders messages to text that spells special tokens out (e.g. "<s>"); encode it with
`tokenizer.encode(text, allow_special=True)` and no extra BOS.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from torchchat.errors import TorchchatError
from torchchat.tokenizer.base import Tokenizer, one_line

Message = dict[str, str]

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
