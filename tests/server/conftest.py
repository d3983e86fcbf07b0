"""Real uvicorn servers on 127.0.0.1 (random free port), each in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import httpx
import openai
import pytest
import torch
import uvicorn

from tests.support import STORIES_BIN, STORIES_TOK
from torchchat.builder import BuiltModel, build_model
from torchchat.options import ExecutionOptions, ModelOptions, SourceOptions
from torchchat.runtime.base import ModelRuntime
from torchchat.server.app import create_app
from torchchat.server.config import ServerOptions

MODEL_ID = "stories260K"
API_KEY = "sk-test-0123456789"


def build_stories() -> BuiltModel:
    """A fresh stories260K (each server owns its model: no runtime is shared between engines)."""
    return build_model(
        ModelOptions(
            source=SourceOptions(checkpoint_path=STORIES_BIN, tokenizer_path=STORIES_TOK),
            execution=ExecutionOptions(dtype="fp32"),
        )
    )


class LiveServer:
    """A uvicorn server running create_app(opts, load) in a background thread."""

    def __init__(self, opts: ServerOptions, load: Callable[[], BuiltModel]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.opts = replace(opts, port=self.port)
        self.app = create_app(self.opts, load)
        self.host = self.app.state.host
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait_loaded: bool = True) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        if wait_loaded:
            assert self.host.loaded.wait(30), "model did not load"
            assert self.host.error is None, self.host.error
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    @property
    def engine(self):
        return self.host.engine

    def client(self, api_key: str | None = None, **kwargs) -> openai.OpenAI:
        """The official openai client pointed at this server."""
        key = api_key or self.opts.api_key or "unused"
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


@contextlib.contextmanager
def live_server(
    opts: ServerOptions | None = None, load: Callable[[], BuiltModel] = build_stories
) -> Iterator[LiveServer]:
    """Start a server, yield it, always shut it down."""
    srv = LiveServer(opts or ServerOptions(model_id=MODEL_ID), load)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """The default server: no key, the default bounds but a 64-token max_tokens limit."""
    with live_server(ServerOptions(model_id=MODEL_ID, max_tokens_limit=64)) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return server.client()


class SlowRuntime(ModelRuntime):
    """Wraps a runtime: each decode step takes `delay` seconds longer and is counted."""

    def __init__(self, inner: ModelRuntime, delay: float):
        super().__init__()
        self.inner, self.delay = inner, delay
        self.args, self.max_seq_len = inner.args, inner.max_seq_len
        self.weight_bytes, self.device = inner.weight_bytes, inner.device
        self.decodes = 0

    def forward(self, tokens, start_pos):
        return self.inner.forward(tokens, start_pos)

    def prefill(self, tokens, start_pos):
        return self.inner.prefill(tokens, start_pos)

    def decode(self, token, pos):
        time.sleep(self.delay)
        self.decodes += 1
        return self.inner.decode(token, pos)


class ScriptedRuntime(ModelRuntime):
    """A runtime that 'generates' a fixed token sequence (then repeats its last token): lets
    tests place UTF-8 characters and stop strings across token boundaries exactly."""

    def __init__(self, inner: ModelRuntime, script: list[int]):
        super().__init__()
        self.args, self.max_seq_len = inner.args, inner.max_seq_len
        self.weight_bytes, self.device = inner.weight_bytes, inner.device
        self.script, self.step = script, 0

    def _next(self) -> torch.Tensor:
        logits = torch.zeros(self.args.vocab_size)
        logits[self.script[min(self.step, len(self.script) - 1)]] = 100.0
        self.step += 1
        return logits

    def forward(self, tokens, start_pos):
        raise NotImplementedError

    def prefill(self, tokens, start_pos):
        self.step = 0
        return self._next()

    def decode(self, token, pos):
        return self._next()


class SlowBatchRuntime(ModelRuntime):
    """Wraps a runtime with a paged KV cache: each paged step takes `delay` seconds longer and
    is logged as (start time, ids of the sequences it fed)."""

    def __init__(self, inner: ModelRuntime, delay: float):
        super().__init__()
        self.inner, self.delay = inner, delay
        self.args, self.max_seq_len = inner.args, inner.max_seq_len
        self.weight_bytes, self.device = inner.weight_bytes, inner.device
        self.steps: list[tuple[float, set[int]]] = []
        self.fed: list[dict[int, int]] = []  # per step: tokens fed to each sequence

    def setup_paged(self, block_size, max_blocks):
        self.block_size = block_size
        return self.inner.setup_paged(block_size, max_blocks)

    def reserve_blocks(self, blocks):
        self.inner.reserve_blocks(blocks)

    def copy_blocks(self, copies):
        self.inner.copy_blocks(copies)

    def kv_cache_bytes(self):
        return self.inner.kv_cache_bytes()

    def forward(self, tokens, start_pos):
        return self.inner.forward(tokens, start_pos)

    def step(self, chunks):
        self.steps.append((time.monotonic(), {c.seq for c in chunks}))
        self.fed.append({c.seq: len(c.tokens) for c in chunks})
        time.sleep(self.delay)
        return self.inner.step(chunks)
