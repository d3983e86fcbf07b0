"""What `torchchat server` is configured with: address, security and the bounds on requests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from torchchat.chat.templates import TEMPLATE_NAMES
from torchchat.errors import TorchchatError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Browser origins allowed by default: pages served from this machine only.
LOCAL_ORIGIN_REGEX = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


@dataclass(frozen=True)
class ServerOptions:
    """Options of the HTTP server (the model itself is described by ModelOptions)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as `Authorization: Bearer KEY` when set
    cors_origins: tuple[str, ...] = ()  # empty: localhost origins only; "*" allows any
    allowed_hosts: tuple[str, ...] = ()  # extra Host header names accepted ("*": any)
    model_id: str = "torchchat"  # the name /v1/models lists and requests may give
    chat_template: str | None = None  # llama2, llama3, chatml, hf (default: from the tokenizer)
    max_queue: int = 16  # requests waiting to start; more get 503
    max_batch: int = 8  # choices generated together (paged KV cache); 1 serves one at a time
    kv_blocks: int | None = None  # most KV blocks (default: max_batch full contexts' worth)
    block_size: int = 16  # positions per KV block (the unit of prefix sharing)
    prefill_chunk: int = 32  # prompt tokens computed per step while other choices decode
    max_tokens_limit: int = 4096  # most tokens one completion may ask for
    max_n: int = 8  # most choices per request
    max_prompt_chars: int | None = None  # characters of prompt text (default: 32 x context)
    max_body_bytes: int = 2 * 1024 * 1024  # larger request bodies get 413
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        for name in (
            "max_queue", "max_batch", "block_size", "prefill_chunk", "max_tokens_limit", "max_n",
            "max_body_bytes",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise TorchchatError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise TorchchatError("--kv-blocks must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise TorchchatError("--threads must be at least 1")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise TorchchatError("--max-prompt-chars must be at least 1")
        if self.chat_template is not None and self.chat_template not in TEMPLATE_NAMES:
            raise TorchchatError(
                f"unknown chat template {self.chat_template!r}: choose one of {', '.join(TEMPLATE_NAMES)}"
            )
        if not 0 <= self.port <= 65535:
            raise TorchchatError(f"--port {self.port} is not a TCP port")

    def prompt_char_limit(self, context: int) -> int:
        """Characters of prompt text accepted before tokenizing."""
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * context

    def host_is_local(self) -> bool:
        """True when bound to loopback only."""
        return self.host in LOCAL_HOSTS or self.host.startswith("127.")


def model_id_for(source: str) -> str:
    """The id a model is served under: its name or file name, without a weights suffix."""
    name = PurePath(source.rstrip("/\\")).name or source
    for suffix in (".bin", ".pth", ".pt", ".gguf", ".pt2", ".pte", ".safetensors"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name
