"""Server-sent events framing, exactly as OpenAI sends it: `data: <compact json>\\n\\n`."""

from __future__ import annotations

import json
from typing import Any

SSE_MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One event: compact JSON (no spaces), non-ASCII kept as UTF-8, on one `data:` line."""
    # json.dumps escapes control characters, so the payload never contains a raw newline.
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode("utf-8") + b"\n\n"
