"""The one shape of every error the API answers: ``{"error": {"status", "field", "message"}}``.

:class:`ApiError` is a client error naming its field; :data:`EXCEPTION_HANDLERS` turns it, FastAPI's
validation errors, HTTP errors, an overloaded batcher, a non-finite model output and an
:class:`~asymvlm.errors.InputError` into that shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from asymvlm.errors import InputError
from asymvlm.serve.batching import Overloaded
from asymvlm.serve.service import NonFiniteResult

__all__ = ["ApiError", "error_response", "EXCEPTION_HANDLERS", "NESTED"]

log = logging.getLogger("asymvlm.serve")

NESTED = "JSON nested too deeply (send a flat JSON value)"


class ApiError(Exception):
    """A client error with the field it concerns: answered as ``{"error": {status, field, message}}``."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


def error_response(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error shape as a response (also an ASGI app: the guard answers with it directly)."""
    return JSONResponse(
        {"error": {"status": status, "field": field, "message": message}}, status_code=status, headers=headers
    )


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    fields, messages = [], []
    for e in errors[:5]:
        loc = list(e.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):  # where, not which field
            loc = loc[1:]
        if e.get("type") == "json_invalid":
            fields.append("body")
            messages.append(f"body: invalid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})")
            continue
        if not loc and isinstance(e.get("input"), (bytes, bytearray)):
            fields.append("body")
            messages.append("body: send a JSON object with Content-Type: application/json")
            continue
        name = ".".join(str(x) for x in loc) or "body"
        fields.append(name)
        messages.append(f"{name}: {e.get('msg', 'invalid')}")
    return error_response(422, fields[0] if fields else "body", "; ".join(messages) or "invalid request")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.field, exc.message, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):  # FastAPI's body parsing
        return error_response(400, "body", f"body: {NESTED}")
    return error_response(exc.status_code, None, str(exc.detail), getattr(exc, "headers", None))


async def _non_finite(request: Request, exc: NonFiniteResult) -> JSONResponse:
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return error_response(500, None, f"{exc} (the model is broken; see the server log)")


async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return error_response(503, None, f"overloaded, retry later: {exc}", {"Retry-After": "1"})


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    return error_response(422, None, str(exc))


EXCEPTION_HANDLERS: dict[type[BaseException], Any] = {
    RequestValidationError: _invalid,
    ApiError: _api_error,
    StarletteHTTPException: _http_error,
    NonFiniteResult: _non_finite,
    Overloaded: _overloaded,
    InputError: _input_error,
}
