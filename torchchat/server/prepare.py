"""Validated requests -> engine jobs: render and tokenize prompts, enforce the server's bounds."""

from __future__ import annotations

import logging

from pydantic import BaseModel

from torchchat.chat.templates import ChatTemplate, render_spans
from torchchat.errors import TorchchatError
from torchchat.options import SamplingOptions
from torchchat.server.config import ServerOptions
from torchchat.server.engine import Choice, Engine, Job
from torchchat.server.errors import ApiError
from torchchat.server.protocol import Reply
from torchchat.server.schemas import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from torchchat.tokenizer import Tokenizer

log = logging.getLogger("torchchat.server")
MIN_SAMPLING = 1e-6  # temperature and top_p below it are greedy


def log_unknown_fields(body: BaseModel, route: str) -> None:
    """Unknown fields are ignored, as OpenAI-compatible servers do, but never silently."""
    names = sorted(body.model_extra or {})
    # A completion request's unknown `messages` field is plain JSON, not ChatMessage objects.
    messages = body.messages if isinstance(body, ChatCompletionRequest) else []
    for i, message in enumerate(messages):
        names += [f"messages.{i}.{k}" for k in sorted(message.model_extra or {})]
    if names:
        # Names are the client's text: quoted (no control characters) and cut short in the log.
        shown = ", ".join(repr(name[:64]) for name in names[:20])
        log.warning("%s: ignoring unknown fields: %s", route, shown)


def check_model(requested: str | None, served: str) -> None:
    """A request naming a model must name the one being served (404 otherwise, like OpenAI)."""
    if requested is not None and requested != served:
        raise ApiError(
            404,
            f"The model `{requested}` does not exist; this server serves `{served}`.",
            "model",
            "model_not_found",
        )


def sampling(body: ChatCompletionRequest | CompletionRequest, index: int) -> SamplingOptions:
    """Sampling for choice `index`; choice i of a seeded request uses seed + i."""
    seed = None if body.seed is None else (body.seed + index) % (1 << 64)
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else None
    # Both limits mean greedy; below these, logits / temperature overflows and top_p rounds
    # to 0 in fp32, which would leave no token to sample from.
    temperature, top_p = body.temperature, body.top_p
    if temperature < MIN_SAMPLING or (top_p is not None and top_p < MIN_SAMPLING):
        temperature, top_p = 0.0, None
    return SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def token_budget(
    requested: int | None, prompt_len: int, context: int, opts: ServerOptions, param: str, what: str
) -> int:
    """max_tokens for one prompt: as asked, else the rest of the context; capped by the limit.
    0 (completions only) asks for the prompt alone, which may then fill the context."""
    if requested is not None and requested > opts.max_tokens_limit:
        raise ApiError(
            400,
            f"{param} is {requested}, above this server's limit of {opts.max_tokens_limit}",
            param,
            "invalid_value",
        )
    if prompt_len > context or (prompt_len == context and requested != 0):
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, your {what} "
            f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
            what,
            "context_length_exceeded",
        )
    room = context - prompt_len
    if requested is None:
        return min(room, opts.max_tokens_limit)
    if requested > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param,
            "context_length_exceeded",
        )
    return requested


def _common_checks(
    body: ChatCompletionRequest | CompletionRequest,
    engine: Engine,
    opts: ServerOptions,
    choices: int,
    wants_logprobs: bool,
) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400,
            "stream_options is only allowed with stream: true",
            "stream_options",
            "invalid_value",
        )
    if choices > opts.max_n:
        raise ApiError(
            400,
            f"{choices} choices requested; this server allows at most {opts.max_n}",
            "n",
            "invalid_value",
        )
    if wants_logprobs and engine.speculator is not None:
        raise ApiError(
            400,
            "logprobs are not supported with speculative decoding",
            "logprobs",
            "unsupported_value",
        )


def prepare_chat(
    body: ChatCompletionRequest, engine: Engine, template: ChatTemplate, opts: ServerOptions
) -> tuple[Job, Reply]:
    """A chat request as a job: messages rendered by the chat template, then tokenized."""
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs: true", "top_logprobs", "invalid_value")
    _common_checks(body, engine, opts, body.n, body.logprobs)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    chars, limit = sum(len(m["content"]) for m in messages), opts.prompt_char_limit(engine.context)
    if chars > limit:
        raise ApiError(
            400,
            f"messages hold {chars} characters; this server accepts at most {limit}",
            "messages",
            "context_length_exceeded",
        )
    try:
        text, spans = render_spans(template, messages)
    except TorchchatError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    tok = engine.tokenizer
    prompt = tok.encode_prompt(text, spans)  # special tokens typed in messages stay text
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    budget = token_budget(requested, len(prompt), engine.context, opts, param, "messages")
    choices = [Choice(i, prompt, budget, sampling(body, i), i == 0) for i in range(body.n)]
    top = (body.top_logprobs or 0) if body.logprobs else None
    job = Job(choices, body.stop_strings(), top)
    reply = Reply("chat", opts.model_id, tok, len(prompt), body.n, _usage_asked(body))
    return job, reply


def prepare_completion(
    body: CompletionRequest, engine: Engine, opts: ServerOptions
) -> tuple[Job, Reply]:
    """A legacy completion request (one or more prompts, text or token ids) as a job."""
    p = body.prompt
    if isinstance(p, list) and not p:
        raise ApiError(400, "prompt must not be an empty list", "prompt", "invalid_value")
    # One text or one token list is a single prompt; a list of them is a batch.
    prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
    _common_checks(body, engine, opts, len(prompts) * body.n, body.logprobs is not None)
    tok = engine.tokenizer
    texts = [p for p in prompts if isinstance(p, str)]
    chars, limit = sum(map(len, texts)), opts.prompt_char_limit(engine.context)
    if chars > limit:
        raise ApiError(
            400,
            f"prompt holds {chars} characters; this server accepts at most {limit}",
            "prompt",
            "context_length_exceeded",
        )
    encoded: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if not p and tok.bos_id is None:
                raise ApiError(
                    400,
                    "empty prompt and the tokenizer has no BOS token",
                    "prompt",
                    "invalid_value",
                )
            encoded.append(tok.encode(p, bos=tok.bos_id is not None))
        elif not p:
            raise ApiError(400, "a token prompt must not be empty", "prompt", "invalid_value")
        else:
            check_token_ids(p, tok.vocab_size, "prompt")
            encoded.append(list(p))
    # echo with logprobs scores the prompt: its tokens' logprobs come before the completion's.
    score = body.echo and body.logprobs is not None
    choices, echo = [], []
    for pi, (ids, original) in enumerate(zip(encoded, prompts, strict=True)):
        budget = token_budget(
            body.max_tokens, len(ids), engine.context, opts, "max_tokens", "prompt"
        )
        for j in range(body.n):
            index = pi * body.n + j
            choices.append(Choice(index, ids, budget, sampling(body, index), j == 0, score))
            if body.echo:
                # A token prompt's text is its tokens' own text, leading space and all.
                echo.append(original if isinstance(original, str) else token_prompt_text(tok, ids))
    job = Job(choices, body.stop_strings(), body.logprobs)
    prompt_tokens = sum(map(len, encoded))
    reply = Reply("text", opts.model_id, tok, prompt_tokens, len(choices), _usage_asked(body))
    reply.echo = echo
    return job, reply


def token_prompt_text(tok: Tokenizer, ids: list[int]) -> str:
    """The text a token prompt spells: its tokens' bytes joined, nothing stripped."""
    return b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids sent by a client must name tokens of the vocabulary."""
    if ids and max(ids) >= vocab_size:
        raise ApiError(
            400,
            f"token id {max(ids)} is outside the vocabulary of {vocab_size} tokens",
            param,
            "invalid_value",
        )


def tokenize_text(tok: Tokenizer, body: TokenizeRequest) -> list[int]:
    """Token ids of a /tokenize request: special-token text becomes its token, as the Hugging
    Face tokenizers vLLM serves do, and BOS leads when asked and the tokenizer adds one. Whole
    documents are tokenized (lm-eval's rolling windows): only --max-body-bytes bounds the text."""
    return tok.encode(body.prompt, bos=body.add_special_tokens and tok.adds_bos, allow_special=True)


def _usage_asked(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)
