"""Request and response bodies of the OpenAI API, with a bound on every field.

Requests are strict (no "1" for 1) and keep unknown fields so the server can log and ignore
them. Response models document the API in /openapi.json; responses themselves are built as
plain dicts in protocol.py, in exactly OpenAI's shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Static bounds, also published in /openapi.json. Prompt text, max_tokens and n are bounded by
# the server's options instead (--max-prompt-chars, --max-tokens-limit, --max-n; checked in
# prepare.py), so that a refusal names the limit in force; --max-body-bytes bounds them all.
MAX_MESSAGES = 1024
MAX_STRING = 1_000_000  # characters of one string field (the body limit usually bites first)
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256
MAX_TOKENS = 1 << 20  # token ids in one token prompt
MAX_TOP_LOGPROBS = 20  # chat completions (OpenAI's limit)
MAX_LOGPROBS = 5  # legacy completions (OpenAI's limit)
MAX_PROMPTS = 16  # prompts in one /v1/completions batch
MAX_TOKEN_ID = 1 << 31
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1  # int64, as OpenAI documents

Name = Annotated[str, Field(max_length=256)]
Text = Annotated[str, Field(max_length=MAX_STRING)]
PromptText = Annotated[str, Field(description="at most --max-prompt-chars characters in all")]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class _Request(BaseModel):
    # Unknown fields are kept (to be logged) and otherwise ignored, as OpenAI servers do.
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Request):
    """One part of a message's content; only text is supported."""

    type: Literal["text"]
    text: PromptText


class ChatMessage(_Request):
    """One message of a conversation. `developer` is OpenAI's newer name for `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: PromptText | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: Name | None = None  # accepted and ignored

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Request):
    """Options of a streamed response."""

    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat and legacy completions."""

    model: Name | None = None  # optional here; when given it must be the served model
    max_tokens: int | None = Field(None, ge=1, description="at most --max-tokens-limit")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1, description="0: greedy")
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKEN_ID, description="-1 or 0: no top-k")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: int = Field(1, ge=1, description="choices per prompt; at most --max-n in all")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None  # accepted and ignored

    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings as a tuple, empty ones dropped (they would match everywhere)."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="at most --max-tokens-limit")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(max_length=MAX_PROMPTS)]
        | Annotated[list[TokenId], Field(max_length=MAX_TOKENS)]
        | Annotated[
            list[Annotated[list[TokenId], Field(max_length=MAX_TOKENS)]],
            Field(max_length=MAX_PROMPTS),
        ]
    )
    # OpenAI's default here is 16; 0 with echo scores the prompt alone.
    max_tokens: int | None = Field(16, ge=0, description="at most --max-tokens-limit")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(
        False, description="the prompt before each choice (its tokens' logprobs too)"
    )


# Responses (documentation of what protocol.py builds).


class Usage(BaseModel):
    class PromptTokensDetails(BaseModel):
        cached_tokens: int

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """A chat completion; with `stream`, `chat.completion.chunk` events instead."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    """A legacy completion; with `stream`, `text_completion` events instead."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok", "loading"]


class ErrorResponse(BaseModel):
    class Error(BaseModel):
        message: str
        type: str
        param: str | None
        code: str

    error: Error


class TokenizeRequest(_Request):
    """POST /tokenize (as vLLM's; lm-eval's `tokenizer_backend=remote` uses it)."""

    prompt: Annotated[str, Field(description="any length under --max-body-bytes")]
    add_special_tokens: bool = Field(True, description="BOS first, as the tokenizer's own encoding")


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    tokens: Annotated[list[TokenId], Field(max_length=MAX_TOKENS)]


class Detokenized(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    model_max_length: int
    chat_template: str | None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}
