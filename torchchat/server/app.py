"""The HTTP API (OpenAI-compatible) and the chat page, on FastAPI."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.staticfiles import StaticFiles

from torchchat.builder import BuiltModel
from torchchat.chat.templates import ChatTemplate, choose_template
from torchchat.errors import TorchchatError
from torchchat.server import protocol
from torchchat.server.config import ServerOptions
from torchchat.server.engine import Engine, Job, QueueFull
from torchchat.server.errors import ApiError, error_response, http_error, validation_error
from torchchat.server.prepare import (
    check_model,
    check_token_ids,
    log_unknown_fields,
    prepare_chat,
    prepare_completion,
    tokenize_text,
)
from torchchat.server.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Detokenized,
    DetokenizeRequest,
    Health,
    Model,
    ModelList,
    Tokenized,
    TokenizeRequest,
    TokenizerInfo,
    error_responses,
)
from torchchat.server.security import install_guards
from torchchat.server.sse import SSE_MEDIA_TYPE

log = logging.getLogger("torchchat.server")
# One server-sent event (OpenAPI before 3.2 describes the events of a stream one by one).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "a compact JSON chunk (`chat.completion.chunk` / `text_completion`), "
            'an in-band `{"error": ...}`, or `[DONE]` last',
        },
        "event": {"type": "string", "enum": ["message"]},
    },
    "required": ["data"],
}
STATIC = Path(__file__).parent / "static"


def _not_a_number(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


class StrictJSONRequest(Request):
    """A request whose JSON body is read as RFC 8259 says: NaN and Infinity are not JSON
    (Python's json module accepts them by default)."""

    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_constant=_not_a_number)
        return self._json


class StrictJSONRoute(APIRoute):
    """A route that parses its body with StrictJSONRequest."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


class ModelHost:
    """Loads the model off the event loop, then holds the engine and chat template."""

    def __init__(self, opts: ServerOptions, load: Callable[[], BuiltModel]):
        self.opts, self._load = opts, load
        self.engine: Engine | None = None
        self.template: ChatTemplate | None = None
        self.error: str | None = None
        self.loaded = threading.Event()  # set when loading ends, well or not
        self.on_error: Callable[[str], None] = lambda message: None

    def start(self) -> None:
        """Begin loading in a background thread (/health answers 503 meanwhile)."""
        threading.Thread(target=self._run, name="torchchat-load", daemon=True).start()

    def _run(self) -> None:
        try:
            built = self._load()
            tok = built.tokenizer
            self.template = choose_template(self.opts.chat_template, tok, tok.chat_template)
            opts = self.opts
            self.engine = Engine(
                built.runtime,
                tok,
                built.speculator,
                opts.max_queue,
                opts.max_batch,
                kv_blocks=opts.kv_blocks,
                block_size=opts.block_size,
                prefill_chunk=opts.prefill_chunk,
            )
            # The objects of the loaded model, torch and the libraries are there for good: out of
            # the collector's sight, a full collection no longer scans them. One took 121 ms in
            # the middle of a burst of chats (stories110M), holding the GIL from the engine and
            # the event loop alike. (vLLM freezes after loading too.)
            gc.collect()
            gc.freeze()
            log.info("model ready: chat template %s", self.template.name)
        except TorchchatError as e:
            self.error = str(e)
            self.on_error(self.error)
        except Exception as e:  # a bug: keep the traceback, and do not serve 503 forever
            log.exception("loading the model failed")
            self.error = f"loading the model failed: {type(e).__name__}: {e}"
            self.on_error(self.error)
        finally:
            self.loaded.set()

    def ready(self) -> Engine:
        """The engine, or 503 while the model is loading."""
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry shortly", None, "model_loading")
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _metrics_text(host: ModelHost) -> str:
    """Prometheus text exposition of the engine's counters."""
    engine = host.engine
    s = engine.stats if engine else None
    rows = [
        ("model_loaded", "gauge", "1 once the model is ready", int(engine is not None)),
        ("queue_waiting", "gauge", "requests waiting for the engine", engine.waiting if engine else 0),
        ("requests_running", "gauge", "requests being generated", engine.running if engine else 0),
        ("requests_total", "counter", "requests served to the end", s.requests if s else 0),
        ("requests_cancelled_total", "counter", "requests whose client left", s.cancelled if s else 0),
        ("requests_failed_total", "counter", "requests that failed while generating", s.failed if s else 0),
        ("prompt_tokens_total", "counter", "prompt tokens of served requests", s.prompt_tokens if s else 0),
        ("cached_tokens_total", "counter", "prompt tokens reused from the KV cache", s.cached_tokens if s else 0),
        ("completion_tokens_total", "counter", "tokens generated", s.completion_tokens if s else 0),
        ("busy_seconds_total", "counter", "time spent generating", round(s.busy_s, 6) if s else 0),
        ("decode_steps_total", "counter", "batched steps that decoded", s.decode_steps if s else 0),
        ("decode_rows_total", "counter", "choices advanced by batched steps", s.decode_rows if s else 0),
        ("prefill_tokens_total", "counter", "prompt tokens computed by batched steps", s.prefill_tokens if s else 0),
        ("kv_blocks_used", "gauge", "paged KV blocks held by sequences", s.kv_blocks_used if s else 0),
        ("kv_cache_bytes", "gauge", "bytes of KV cache allocated", engine.runtime.kv_cache_bytes() if engine else 0),
    ]  # fmt: skip
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP torchchat_{name} {help_text}", f"# TYPE torchchat_{name} {kind}"]
        lines.append(f"torchchat_{name} {value}")
    return "\n".join(lines) + "\n"


_watchers: set[asyncio.Task] = set()


class CountArrivals:
    """Counts each completion request with the engine (`Engine.arrival`) from its first bytes
    until its job is queued or it ends: requests of a burst all enter here within a few ms but
    are parsed, templated and tokenized one after another on the event loop."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app, host: ModelHost):
        self.app, self.host = app, host

    async def __call__(self, scope, receive, send) -> None:
        engine = self.host.engine
        counted = scope["type"] == "http" and scope["method"] == "POST"
        if engine is None or not counted or scope["path"] not in self.PATHS:
            return await self.app(scope, receive, send)
        arrival = engine.arrival()
        scope.setdefault("state", {})["arrival"] = arrival
        try:
            await self.app(scope, receive, send)
        finally:
            arrival.end()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away. uvicorn answers `http.disconnect` to every
    receive() once the client has left (or the response is complete), so this task always ends."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            return


async def _respond(request: Request, engine: Engine, job: Job, reply, stream: bool) -> Response:
    """Queue the job; stream its events as SSE or wait and answer with one JSON body."""
    try:
        engine.submit(job, getattr(request.state, "arrival", None))
    except QueueFull as e:
        raise ApiError(503, f"server is busy ({e}); retry later", None, "server_busy") from None
    # Also covers a stream whose body never starts (the client left before its first byte).
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    _watchers.add(watcher)  # asyncio keeps only weak references to tasks
    watcher.add_done_callback(_watchers.discard)
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            protocol.stream(job, reply), media_type=SSE_MEDIA_TYPE, headers=headers
        )
    try:
        return JSONResponse(await protocol.collect(job, reply))
    finally:
        watcher.cancel()
        job.cancelled.set()  # a no-op when done; stops the generation on any early exit


def create_app(opts: ServerOptions, load: Callable[[], BuiltModel]) -> FastAPI:
    """The ASGI app. `load` builds the model; it runs in a thread once the server starts."""
    host = ModelHost(opts, load)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host.start()
        yield
        host.close()

    # No /docs or /redoc: their pages load scripts from a CDN. /openapi.json stays.
    app = FastAPI(
        title="torchchat",
        summary="OpenAI-compatible API for a torchchat model",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.router.route_class = StrictJSONRoute
    app.state.host = host
    install_guards(app, opts)
    # Outermost: the guards read the body first, and a burst's first request then reached the
    # engine before the others were counted.
    app.add_middleware(CountArrivals, host=host)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_failure(request: Request, exc: HTTPException) -> Response:
        message = "Not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(http_error(exc.status_code, message), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        error = ApiError(500, "internal server error (see the server log)", None, "internal_error")
        return error_response(error)

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health}},
        summary="200 when the model is ready, 503 while it loads",
    )
    async def health() -> Response:
        if host.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def model_card() -> dict:
        return {"id": opts.model_id, "object": "model", "created": started, "owned_by": "torchchat"}

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
    async def list_models() -> Response:
        host.ready()
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get(
        "/v1/models/{model_id:path}", response_model=Model, responses=error_responses(401, 404, 503)
    )
    async def get_model(model_id: str) -> Response:
        host.ready()
        check_model(model_id, opts.model_id)
        return JSONResponse(model_card())

    def completion_responses(model: type) -> dict:
        ok = {"model": model, "content": {SSE_MEDIA_TYPE: {"schema": SSE_EVENT_SCHEMA}}}
        return {200: ok, **error_responses(400, 401, 404, 413, 503)}

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=completion_responses(ChatCompletion),
        summary="Chat completion (streamed as server-sent events with `stream: true`)",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = host.ready()
        check_model(body.model, opts.model_id)
        log_unknown_fields(body, "/v1/chat/completions")
        job, reply = prepare_chat(body, engine, host.template, opts)
        return await _respond(request, engine, job, reply, body.stream)

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=completion_responses(Completion),
        summary="Text completion (streamed as server-sent events with `stream: true`)",
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = host.ready()
        check_model(body.model, opts.model_id)
        log_unknown_fields(body, "/v1/completions")
        job, reply = prepare_completion(body, engine, opts)
        return await _respond(request, engine, job, reply, body.stream)

    # The tokenizer, as vLLM serves it: clients that count or split tokens themselves (lm-eval's
    # `tokenizer_backend=remote`) then tokenize exactly as the server does.
    @app.get("/tokenizer_info", response_model=TokenizerInfo, responses=error_responses(401, 503))
    async def tokenizer_info() -> Response:
        engine = host.ready()
        tok = engine.tokenizer
        return JSONResponse(
            {
                "tokenizer_class": tok.kind,
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "model_max_length": engine.context,
                "chat_template": tok.chat_template,
            }
        )

    @app.post("/tokenize", response_model=Tokenized, responses=error_responses(400, 401, 413, 503))
    async def tokenize(body: TokenizeRequest) -> Response:
        engine = host.ready()
        tokens = tokenize_text(engine.tokenizer, body)
        return JSONResponse(
            {"count": len(tokens), "max_model_len": engine.context, "tokens": tokens}
        )

    @app.post(
        "/detokenize", response_model=Detokenized, responses=error_responses(400, 401, 413, 503)
    )
    async def detokenize(body: DetokenizeRequest) -> Response:
        engine = host.ready()
        check_token_ids(body.tokens, engine.tokenizer.vocab_size, "tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})

    @app.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401))
    async def metrics() -> Response:
        return PlainTextResponse(_metrics_text(host), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
