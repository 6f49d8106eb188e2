"""One error envelope for every error: ``{"error": {"message", "type", "param", "code"}}``.

The shape OpenAI and vLLM use. `param` is the exact field at fault, written as a path
(``events[3].timestamp``); `type` is the family, `code` the specific reason.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.app.events import describe_errors, loc_to_param
from agent.domain.errors import (
    CallerError,
    ModelUnavailableError,
    OutputValidationError,
    RuntimeFailure,
    UnknownUserError,
)

__all__ = ["ERROR_RESPONSES", "ApiError", "ErrorEnvelope", "describe_errors", "envelope", "install_error_handlers",
           "loc_to_param"]
log = logging.getLogger("shoplens.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An error the API answers with its envelope (and optional headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "invalid_request_error")


def envelope(status: int, message: str, *, code: str | None, param: str | None = None,
             type_: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_ or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        first = next(e for e in errs if e.get("type") == "json_invalid")
        where = (first.get("ctx") or {}).get("error", "")
        return envelope(400, f"request body is not valid JSON ({where})".replace(" ()", ""),
                        code="invalid_json")
    items = describe_errors(errs)
    if any(tuple(e.get("loc", ())) == ("body",) for e in errs):
        missing = any(e.get("type") == "missing" for e in errs)
        return envelope(422, "request body is required" if missing else "request body must be a JSON object",
                        code="missing_body" if missing else "invalid_body")
    first = items[0]
    more = "" if len(items) == 1 else f" (and {len(items) - 1} more: " + "; ".join(
        f"{i['param']}: {i['message']}" for i in items[1:4]) + ")"
    msg = f"{first['param'] or 'body'}: {first['message']}{more}"
    return envelope(422, msg, code=first["code"], param=first["param"])


async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return envelope(exc.status, exc.message, code=exc.code, param=exc.param, type_=exc.type,
                    headers=exc.headers)


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and str(exc.detail) == "There was an error parsing the body":
        # FastAPI's own wording when the JSON decoder gives up (nesting thousands deep, a
        # number of thousands of digits): the same error as any other unreadable body
        return envelope(400, "request body is not valid JSON (too deeply nested, or a number too long to read)",
                        code="invalid_json")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return envelope(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


async def _caller_error_handler(request: Request, exc: CallerError) -> JSONResponse:
    """Every caller mistake, by its own status and code. An unknown user's message never lists
    other stored ids (that would let one client enumerate another's users)."""
    message = str(exc)
    if isinstance(exc, UnknownUserError):
        message = (f"no user {exc.user_id!r} in dataset {exc.dataset!r} (or send the user's events "
                   "inline)")
    return envelope(exc.status, message, code=exc.code, param=exc.param)


async def _runtime_failure_handler(request: Request, exc: RuntimeFailure) -> JSONResponse:
    """A runtime failure that reached the HTTP layer (tasks with a labelled fallback never let
    one through): 503 with Retry-After when the model is unavailable, else 502 naming it."""
    log.warning("runtime failure: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, ModelUnavailableError):
        retry = max(1, round(exc.retry_after_s or 5))
        return envelope(503, f"the model is unavailable: {exc}", code="model_unavailable",
                        headers={"Retry-After": str(retry)})
    code = "model_output_invalid" if isinstance(exc, OutputValidationError) else "upstream_failure"
    return envelope(502, f"{type(exc).__name__}: {exc}", code=code, type_="internal_error")


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error: %s", type(exc).__name__)
    return envelope(500, "internal error; the request id identifies it in the logs", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(CallerError, _caller_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RuntimeFailure, _runtime_failure_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorEnvelope, "description": d}
    for s, d in [(400, "malformed JSON"), (401, "missing API key"),
                 (403, "unknown API key, or one without the route's scope"),
                 (413, "body, batch or text too large"), (422, "invalid input"),
                 (429, "rate limited (see Retry-After)")]
}
