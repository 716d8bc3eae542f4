"""The outermost HTTP layers of the inference server: the access log and CORS.

``AccessLog`` writes one line per request to the ``appliance.serve.access`` logger:
``METHOD PATH model=M status=S tokens=P+C ms=T client=HOST:PORT``. The route fills in the model
and token counts through ``note`` (a context variable holding this request's record, shared
with the tasks a streamed answer runs in), so the line is written when the response is
complete, a stream included.

``Cors`` answers preflight requests and adds ``Access-Control-Allow-Origin`` for the origins
given with ``--cors-origin`` (``*`` for any); with none, no CORS header is ever sent, so a
browser page from elsewhere cannot read answers.
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.format import receipt

access_log = logging.getLogger("appliance.serve.access")

_record: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "appliance_serve_access", default=None)


def note(model: str | None = None, stats: dict[str, Any] | None = None) -> None:
    """Record the model and token counts of the request being answered (no-op outside one)."""
    record = _record.get()
    if record is None:
        return
    if model is not None:
        record["model"] = model
    if stats is not None:
        record["prompt"] = record.get("prompt", 0) + int(stats.get("prompt_tokens", 0))
        record["completion"] = (record.get("completion", 0)
                                + int(stats.get("completion_tokens", 0)))


class AccessLog:
    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # the ServerState: create_app's callers reach it through here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record: dict[str, Any] = {}
        token = _record.set(record)
        started = time.perf_counter()
        status = 500

        async def noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            _record.reset(token)
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            tokens = (f"{record['prompt']}+{record['completion']}" if "prompt" in record
                      else "-")
            access_log.info("%s %s model=%s status=%d tokens=%s ms=%.1f client=%s",
                            scope["method"], scope["path"], record.get("model", "-"), status,
                            tokens, (time.perf_counter() - started) * 1000, where)


_EXPOSED = f"{receipt.HEADER}, {receipt.ERROR_HEADER}".encode()


class Cors:
    def __init__(self, app: ASGIApp, origins: tuple[str, ...]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    def _allowed(self, origin: str | None) -> str | None:
        if not origin or not self.origins:
            return None
        if "*" in self.origins:
            return "*"
        return origin if origin in self.origins else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.origins:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        allowed = self._allowed(headers.get("origin"))
        if (scope["method"] == "OPTIONS" and allowed
                and "access-control-request-method" in headers):
            # A preflight carries no credentials: answered before the API key check.
            response = Response(status_code=204, headers={
                "Access-Control-Allow-Origin": allowed,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": headers.get(
                    "access-control-request-headers", "authorization, content-type"),
                "Access-Control-Max-Age": "600", "Vary": "Origin"})
            await response(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start" and allowed:
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"access-control-allow-origin", allowed.encode()),
                                      # a page may read the answer's receipt
                                      (b"access-control-expose-headers", _EXPOSED),
                                      (b"vary", b"Origin")]
            await send(message)

        await self.app(scope, receive, with_cors)
