"""OpenAI response shapes built from engine events: whole responses and SSE chunk streams."""

from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

from torchchat.server.engine import End, Failed, Finish, Job, Piece, PromptScores, TokenLogprob
from torchchat.server.errors import ApiError, error_body
from torchchat.server.sse import DONE, sse_event
from torchchat.tokenizer import Tokenizer

SYSTEM_FINGERPRINT = "fp_torchchat"


@dataclass
class Reply:
    """What a request answers with: identity, model, and per-choice extras (echoed prompts)."""

    kind: str  # "chat" or "text"
    model: str
    tokenizer: Tokenizer
    prompt_tokens: int  # all prompts of the request, counted once each
    n_choices: int
    include_usage: bool = False
    echo: list[str] = field(default_factory=list)  # completions with echo: text before each choice
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex

    def head(self, obj: str) -> dict[str, Any]:
        """Fields every response and chunk of this request starts with."""
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI shows it: its text (bad UTF-8 replaced) and its raw bytes."""
    raw = tokenizer.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion."""
    content = []
    for e in entries:
        text, raw = token_text(tokenizer, e.token)
        top = []
        for t, lp in e.top:
            t_text, t_raw = token_text(tokenizer, t)
            top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def text_logprobs(
    tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int, offsets: list[int] | None = None
) -> dict[str, Any]:
    """`choices[].logprobs` of a legacy completion; offsets as given, else counted from `offset`."""
    tokens, values, tops, starts = [], [], [], []
    for e in entries:
        text, _ = token_text(tokenizer, e.token)
        top = None
        if e.top is not None:  # None: a prompt's first token, which has no logprob
            top = {token_text(tokenizer, t)[0]: lp for t, lp in e.top}
            top[text] = e.logprob  # the chosen token is always listed, as OpenAI does
        tokens.append(text)
        values.append(e.logprob)
        tops.append(top)
        starts.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": starts if offsets is None else offsets,
    }


def prompt_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], echo: str) -> dict[str, Any]:
    """`logprobs` of an echoed prompt, each text_offset the place its token starts in `echo`."""
    starts, spelled = _spelled_offsets(tokenizer, [e.token for e in entries])
    return text_logprobs(tokenizer, entries, 0, _align(starts, spelled, echo))


def _spelled_offsets(tokenizer: Tokenizer, tokens: Sequence[int]) -> tuple[list[int], str]:
    """The text the tokens spell (their bytes joined) and where each token starts in it; a token
    that begins inside a character starts where that character does."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    starts, text = [], ""
    for token in tokens:
        starts.append(len(text))
        text += decoder.decode(tokenizer.token_bytes(token))
    return starts, text + decoder.decode(b"", final=True)


def _align(starts: list[int], spelled: str, text: str) -> list[int]:
    """Offsets into `spelled` moved to `text`, the prompt as sent, which differs from it by what
    the tokenizer normalizes (sentencepiece's dummy-prefix space, collapsed spaces): a position
    inside a common stretch maps exactly, one in a gap to where the next common stretch begins."""
    if spelled == text:
        return starts
    blocks = SequenceMatcher(None, spelled, text, autojunk=False).get_matching_blocks()
    out, i = [], 0
    for start in starts:  # increasing, as the blocks are
        while start >= blocks[i].a + blocks[i].size and blocks[i].size:
            i += 1
        a, b, _ = blocks[i]
        out.append(b + max(0, start - a))
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class _Tally:
    """Usage counted from Finish events."""

    completion: int = 0
    cached: int = 0


async def collect(job: Job, reply: Reply) -> dict[str, Any]:
    """Wait for every choice and build the whole (non-streamed) response."""
    texts = {i: reply.echo[i] if reply.echo else "" for i in range(reply.n_choices)}
    logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(reply.n_choices)}
    prompts: dict[int, list[TokenLogprob]] = {}
    finish: dict[int, str] = {}
    tally = _Tally()
    first = {c.index: c.first_of_prompt for c in job.choices}
    while True:
        event = await job.next_event()
        if isinstance(event, PromptScores):
            prompts[event.index] = event.logprobs
        elif isinstance(event, Piece):
            texts[event.index] += event.text
            logprobs[event.index] += event.logprobs
        elif isinstance(event, Finish):
            finish[event.index] = event.finish_reason
            logprobs[event.index] += event.logprobs
            tally.completion += event.completion_tokens
            tally.cached += event.cached_tokens if first[event.index] else 0
        elif isinstance(event, Failed):
            raise ApiError(event.status, event.message, None, event.code)
        elif isinstance(event, End):
            break
    want_lp = job.top_logprobs is not None
    choices = []
    for i in range(reply.n_choices):
        if reply.kind == "chat":
            lp = chat_logprobs(reply.tokenizer, logprobs[i]) if want_lp else None
            message = {"role": "assistant", "content": texts[i], "refusal": None}
            choices.append(
                {"index": i, "message": message, "logprobs": lp, "finish_reason": finish[i]}
            )
        else:
            start = len(reply.echo[i]) if reply.echo else 0
            lp = text_logprobs(reply.tokenizer, logprobs[i], start) if want_lp else None
            if i in prompts:
                echoed = prompt_logprobs(reply.tokenizer, prompts[i], reply.echo[i])
                lp = {key: echoed[key] + lp[key] for key in lp}
            choices.append(
                {"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]}
            )
    obj = "chat.completion" if reply.kind == "chat" else "text_completion"
    return {
        **reply.head(obj),
        "choices": choices,
        "usage": usage(reply.prompt_tokens, tally.completion, tally.cached),
    }


async def stream(job: Job, reply: Reply) -> AsyncIterator[bytes]:
    """SSE frames: (chat) a role chunk per choice first, content chunks, a finish chunk per
    choice, the usage chunk if asked, then `data: [DONE]`. Leaving early cancels the job."""
    chat = reply.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    want_lp = job.top_logprobs is not None
    first = {c.index: c.first_of_prompt for c in job.choices}
    offsets = {i: len(reply.echo[i]) if reply.echo else 0 for i in range(reply.n_choices)}
    scored = {c.index for c in job.choices if c.score_prompt}
    tally = _Tally()

    def chunk(
        index: int,
        body: dict[str, Any],
        entries: list[TokenLogprob] | PromptScores | None,
        fin=None,
    ):
        lp = None
        if want_lp and isinstance(entries, PromptScores):
            lp = prompt_logprobs(reply.tokenizer, entries.logprobs, reply.echo[index])
        elif want_lp and entries is not None:
            if chat:
                lp = chat_logprobs(reply.tokenizer, entries)
            else:
                lp = text_logprobs(reply.tokenizer, entries, offsets[index])
                offsets[index] += sum(len(t) for t in lp["tokens"])
        choice = {"index": index, **body, "logprobs": lp, "finish_reason": fin}
        out = {**reply.head(obj), "choices": [choice]}
        if reply.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return sse_event(out)

    try:
        for i in range(reply.n_choices):
            if chat:
                yield chunk(i, {"delta": {"role": "assistant", "content": ""}}, None)
            elif reply.echo and i not in scored:  # a scored prompt waits for its logprobs
                yield chunk(i, {"text": reply.echo[i]}, None)
        while True:
            event = await job.next_event()
            if isinstance(event, PromptScores):
                yield chunk(event.index, {"text": reply.echo[event.index]}, event)
            elif isinstance(event, Piece):
                body = {"delta": {"content": event.text}} if chat else {"text": event.text}
                yield chunk(event.index, body, event.logprobs)
            elif isinstance(event, Finish):
                tally.completion += event.completion_tokens
                tally.cached += event.cached_tokens if first[event.index] else 0
                body = {"delta": {}} if chat else {"text": ""}
                entries = event.logprobs or None
                yield chunk(event.index, body, entries, event.finish_reason)
            elif isinstance(event, Failed):
                # Headers are long sent: report in-band, as vLLM and llama.cpp do.
                yield sse_event(error_body(event.status, event.message, None, event.code))
                break
            elif isinstance(event, End):
                if reply.include_usage:
                    total = usage(reply.prompt_tokens, tally.completion, tally.cached)
                    yield sse_event({**reply.head(obj), "choices": [], "usage": total})
                break
        yield DONE
    finally:
        job.cancelled.set()  # a no-op when finished; stops the generation if the client left
