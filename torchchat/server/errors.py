"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

# HTTP status -> the OpenAI error `type` clients switch on.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


# Codes of errors raised by the HTTP layer itself (FastAPI's HTTPException): a body it could not
# parse, a path or a method it does not have.
HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}

_FIELD = re.compile(r"[a-z_][a-z0-9_]*")


class ApiError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to send back."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str = "invalid_request"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None, code: str) -> dict[str, Any]:
    """The JSON body of an error response."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """An ApiError as an HTTP response."""
    body = error_body(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=headers)


def http_error(status: int, message: str) -> ApiError:
    """An error of the HTTP layer (no such path or method, an unreadable body)."""
    return ApiError(status, message, None, HTTP_CODES.get(status, f"http_{status}"))


def validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's complaint about a request body as a 400 (OpenAI never answers 422)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error")
        detail = f": {reason}" if reason else ""
        return ApiError(400, f"request body is not valid JSON{detail}", None, "invalid_json")
    param = _param(first.get("loc", ()))
    if not param:  # the body as a whole: not an object, or not sent as JSON
        return ApiError(
            400,
            "request body must be a JSON object, sent with Content-Type: application/json",
            None,
            "invalid_json",
        )
    # A union field fails once per alternative ("not a string", "list too long"): the error
    # that is not a mere type mismatch says what is wrong with the value sent.
    same = [e for e in errors if f"{_param(e.get('loc', ()))}.".startswith(f"{param}.")]
    best = next((e for e in same if not str(e.get("type", "")).endswith("_type")), first)
    param = _param(best.get("loc", ()))
    message = "field required" if best.get("type") == "missing" else str(best.get("msg", ""))
    return ApiError(400, f"{param}: {message or 'invalid value'}", param, "invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str:
    """A pydantic error location as OpenAI's `param` ("messages.0.role"): no "body" prefix,
    no union alternative tags ("constrained-str", "list[int]", "TextPart")."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif part != "body" and part not in _TYPE_TAGS and _FIELD.fullmatch(part):
            parts.append(part)
    return ".".join(parts)
