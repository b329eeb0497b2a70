"""The ASGI guard of ``asymvlm-serve``: the API key, the body limits and deadlines, the security
headers and the request metrics, in one pure-ASGI layer (no per-request task switching as in
``BaseHTTPMiddleware``), put outside FastAPI's own stack (:func:`install`) so that they apply before
any routing or parsing.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from asymvlm.serve.config import ServeConfig
from asymvlm.serve.handlers import error_response

__all__ = ["Guard", "install", "OPEN_PATHS", "PAGE_PATHS", "UPLOAD_PATHS"]

UPLOAD_PATHS = ("/v1/search/image/upload", "/v1/classify/upload")
OPEN_PATHS = ("/healthz", "/readyz")  # never need the API key
PAGE_PATHS = ("/", "/static/app.js", "/static/style.css")

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
]


class Guard:
    """A pure-ASGI layer outside FastAPI's stack: the API key (constant-time, every path but
    :data:`OPEN_PATHS`), the body limits (413 from ``Content-Length`` or while reading; 408 past
    ``read_timeout_s``), the security headers on every answer, and one metrics observation per request."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Any):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.key = None if config.api_key is None else config.api_key.encode()

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given: list[bytes] = []
        if b"x-api-key" in headers:
            given.append(headers[b"x-api-key"])
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            given.append(value.strip())
        elif scheme.lower() == b"basic":
            try:
                given.append(base64.b64decode(value.strip(), validate=True).partition(b":")[2])
            except ValueError:
                pass
        ok = False
        for g in given:  # every candidate compared in constant time
            ok |= hmac.compare_digest(g, self.key)
        return ok

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        status_seen = {"code": 500}

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.key is not None and path not in OPEN_PATHS and not self._authorized(headers):
                challenge = 'Basic realm="asymvlm", charset="UTF-8"' if path in PAGE_PATHS else 'Bearer realm="asymvlm"'
                await error_response(401, "authorization", "missing or wrong API key", {"WWW-Authenticate": challenge})(
                    scope, receive, send_wrapped
                )
                return
            limit = self.config.max_upload_bytes + 65536 if path in UPLOAD_PATHS else self.config.max_body_bytes
            declared = headers.get(b"content-length")
            if declared is not None:
                try:
                    n = int(declared)
                except ValueError:
                    n = -1
                if n < 0:
                    await error_response(400, "content-length", "invalid Content-Length header")(
                        scope, receive, send_wrapped
                    )
                    return
                if n > limit:
                    await too_large(limit)(scope, receive, send_wrapped)
                    return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = bytearray()
                more = True
                deadline = time.monotonic() + self.config.read_timeout_s
                while more:
                    try:  # a slow client (a body trickled in) holds a connection until the deadline only
                        message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        await too_slow(self.config.read_timeout_s)(scope, receive, send_wrapped)
                        return
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > limit:
                        await too_large(limit)(scope, receive, send_wrapped)
                        return
                replayed = False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": bytes(body), "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_wrapped)
            else:
                await self.app(scope, receive, send_wrapped)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or ("static" if path in PAGE_PATHS else "unmatched")
            self.metrics.observe_request(
                name, scope.get("method", ""), status_seen["code"], time.perf_counter() - start
            )


def too_slow(seconds: float) -> JSONResponse:
    message = f"the request body was not received within {seconds:g} s (read_timeout_s)"
    return error_response(408, "body", message, {"Connection": "close"})


def too_large(limit: int) -> JSONResponse:
    return error_response(413, "body", f"the request body is over the limit of {limit} bytes")


# ----------------------------------------------------------------------------------------------


def install(app: FastAPI, config: ServeConfig, metrics: Any) -> None:
    """Put the guard (and CORS, when origins are configured) outside the app's middleware stack, its
    exception middleware included."""
    guarded = Guard(app, config, metrics)  # the outermost layer (inside CORS, if any)
    outer: Any = guarded
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        outer = CORSMiddleware(
            guarded,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    build = app.build_middleware_stack

    def build_with_guard() -> Any:
        guarded.app = build()
        return outer

    app.build_middleware_stack = build_with_guard
