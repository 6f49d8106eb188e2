"""The outermost layer: request id, body size limit, metrics, one JSON log line per request,
and one audit line (logger ``shoplens.api.audit``) per request to a user's data.

A plain ASGI middleware (no BaseHTTPMiddleware), so it also wraps errors: an exception that
escapes the app becomes the 500 envelope here, still with its X-Request-ID.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ui.api.errors import envelope
from ui.api.metrics import Metrics

log = logging.getLogger("shoplens.api")
access_log = logging.getLogger("shoplens.api.access")
# Every read or delete of a user's data (GET/DELETE /v1/users/...), allowed or refused: who (key
# id), whose (stored user id: pseudonymised when configured), what (route, action) and the outcome.
audit_log = logging.getLogger("shoplens.api.audit")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


class _TooLarge(Exception):
    pass


class ApiMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        rid = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_wrapped(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def reply(resp: Any) -> None:
            await resp(scope, receive, send_wrapped)

        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await reply(_too_large(self.max_body_bytes))
                return
            try:
                body_receive = await self._buffer(receive)
            except _TooLarge:
                await reply(_too_large(self.max_body_bytes))
                return
            try:
                await self.app(scope, body_receive, send_wrapped)
            except Exception:
                log.exception("unhandled error in %s %s", scope["method"], scope["path"])
                if not started:
                    await reply(envelope(500, "internal error; quote the X-Request-ID header when "
                                         "reporting it", code="internal_error"))
        finally:
            dt = time.perf_counter() - t0
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route, str(status)).observe(dt)
            state = scope.get("state") or {}
            audit = state.get("audit")
            # A user-data path holds the caller's raw user id: its line has the route instead, and
            # the audit line has the stored (pseudonymised) id.
            access_log.info("request", extra={"fields": {
                "request_id": rid, "method": scope["method"], "path": route if audit else scope["path"],
                "route": route, "status": status,
                "duration_ms": round(dt * 1000, 1),
                "key_id": state.get("key_id"),
            }})
            if audit is not None:
                audit_log.info("user data access", extra={"fields": {
                    "audit": True, "request_id": rid, **audit, "key_id": state.get("key_id"),
                    "method": scope["method"], "route": route, "status": status,
                }})
            request_id_var.reset(token)

    async def _buffer(self, receive: Receive) -> Receive:
        """Read the whole body (at most `max_body_bytes`), then replay it to the app."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(body)
            more = message.get("more_body", False)
        data = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay


def _too_large(limit: int) -> Any:
    return envelope(413, f"request body exceeds {limit} bytes (SHOPLENS_MAX_BODY_BYTES)",
                    code="body_too_large")


def _route_template(scope: Scope) -> str:
    """The matched route's path template without converters (``/v1/users/{user_id}/events``,
    as in the OpenAPI document; a bounded label set), or 'unmatched'."""
    route = scope.get("route")
    return getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for ShopLens and uvicorn's error log (uvicorn's access log is off:
    ours carries the request id and key id)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
