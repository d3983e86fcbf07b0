"""ASGI guards in front of the API: CORS, Host check, API key, body size limit."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from torchchat.server.config import LOCAL_HOSTS, LOCAL_ORIGIN_REGEX, ServerOptions
from torchchat.server.errors import ApiError, error_response

# Reachable without the API key: the health probe and the chat page's own files (the page
# asks for the key and sends it with its API calls).
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


async def _send_error(scope: Scope, receive: Receive, send: Send, error: ApiError, **headers):
    await error_response(error, headers or None)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(host_header: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_host_names(opts: ServerOptions) -> frozenset[str] | None:
    """Host names requests may address (None: any). Loopback names always; the bound address;
    --allowed-hosts. Bound to every interface and given no list, any name is accepted (the API
    key is then the guard: the server warns when there is none)."""
    if "*" in opts.allowed_hosts:
        return None
    extra = {host_name(h) for h in opts.allowed_hosts}
    if _is_wildcard(opts.host):
        return None if not extra else frozenset({*LOCAL_HOSTS, *extra})
    return frozenset({*LOCAL_HOSTS, host_name(opts.host), *extra})


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


class HostCheck:
    """400 for a Host header naming another site: defeats DNS rebinding, where a hostile page
    resolves its own name to 127.0.0.1 to reach a local server with the browser's help."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            host = _header(scope, b"host")
            if host is None or host_name(host) not in self.allowed:
                error = ApiError(400, f"Host header {host!r} is not allowed", None, "invalid_host")
                return await _send_error(scope, receive, send, error)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over the limit, whether declared (Content-Length) or streamed.

    The body is read here, up to the limit, and handed on in one piece: bodies are small, and
    the app would read all of it anyway."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = ApiError(
            413, f"request body exceeds {self.max_bytes} bytes", None, "body_too_large"
        )
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_error(scope, receive, send, error)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _send_error(scope, receive, send, error)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class ApiKeyCheck:
    """401 unless `Authorization: Bearer KEY` carries the key (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        # Digests have one length, so neither the key's length nor its content leaks by timing.
        return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.digest is not None:
            path = scope.get("path", "")
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public and not self._authorized(scope):
                missing = _header(scope, b"authorization") is None
                message = (
                    "You didn't provide an API key: send `Authorization: Bearer KEY`."
                    if missing
                    else "Incorrect API key provided."
                )
                error = ApiError(401, message, None, "invalid_api_key")
                return await _send_error(
                    scope, receive, send, error, **{"WWW-Authenticate": "Bearer"}
                )
        await self.app(scope, receive, send)


def install_guards(app: Starlette, opts: ServerOptions) -> None:
    """Add the guards; the last added runs first: CORS, Host check, API key (so no body is read
    for a client without it), body limit."""
    app.add_middleware(BodyLimit, max_bytes=opts.max_body_bytes)
    app.add_middleware(ApiKeyCheck, api_key=opts.api_key)
    app.add_middleware(HostCheck, allowed=allowed_host_names(opts))
    cors = dict(
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        max_age=600,
    )
    if opts.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(opts.cors_origins), **cors)
    else:
        app.add_middleware(CORSMiddleware, allow_origin_regex=LOCAL_ORIGIN_REGEX, **cors)
