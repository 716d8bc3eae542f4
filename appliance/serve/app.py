"""The OpenAI-compatible HTTP front (Starlette): routes, error shape, auth, metrics.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings`` (with ``stream: true``: server-sent events
ending ``data: [DONE]``), ``GET /health`` (503 until every model is ready; needs no key) and
``GET /metrics`` (Prometheus text). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with these statuses:

    BadRequestError 400 · bad or missing API key 401 · ModelNotFoundError 404 ·
    QueueFullError 429 · WorkerCrashedError 500 (names the signal) · RefusalError 503
    (model refused by the integrity check) · other ServeError 503 (loading, failed) · else 500

A request for a streaming response is answered with a JSON error (and its status) if it fails
before the first token; after that, failures arrive as an SSE ``data: {"error": ...}`` event.
A client that disconnects stops its generation in the worker within a token, streamed or not
(a non-streamed one is counted with status 499, nginx's "client closed request").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.errors import (
    ApplianceError,
    BadRequestError,
    ModelNotFoundError,
    QueueFullError,
    RefusalError,
    ServeError,
    WorkerCrashedError,
)
from appliance.serve import ollama, passthrough, protocol
from appliance.serve import receipts as receipt_layer
from appliance.serve.access import AccessLog, Cors
from appliance.serve.auth import authorized
from appliance.serve.llama_server import UNLOADED, engine_metrics
from appliance.serve.metrics import CONTENT_TYPE
from appliance.serve.model import ModelResolver, ServeSettings
from appliance.serve.state import ServerState
from appliance.serve.supervisor import READY, Audit, Worker

log = logging.getLogger("appliance.serve")

CLIENT_CLOSED = 499  # nginx's status for a request its client abandoned (metrics only)
PUBLIC_PATHS = frozenset({"/health"})
UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})  # not requests "in flight"
KNOWN_PATHS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions",
                         "/v1/completions", "/v1/embeddings"})


def create_app(settings: ServeSettings, resolver: ModelResolver, *,
               audit: Audit | None = None,
               receipts: receipt_layer.ReceiptOptions | None = None) -> ASGIApp:
    """Build the ASGI app; workers start loading when the server starts (lifespan). With
    ``receipts``, every generated answer carries a signed receipt (serve/receipts.py)."""
    state = ServerState(settings, resolver, audit)
    routes = [
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/v1/models/{model:path}", _model, methods=["GET"]),
        Route("/v1/chat/completions", _chat, methods=["POST"]),
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/embeddings", _embeddings, methods=["POST"]),
        *ollama.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=state.lifespan,
        exception_handlers={ApplianceError: _on_error, HTTPException: _on_http_error,
                            Exception: _on_bug},
    )
    app.state.serve = state
    inner: ASGIApp = app if receipts is None else receipt_layer.ReceiptLayer(app, state, receipts)
    return AccessLog(Cors(_Front(inner, state), settings.cors_origins), state)


class _Front:
    """Outermost ASGI layer: API keys, in-flight count, per-path status counts."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = path if path in KNOWN_PATHS or ollama.is_ollama_path(path) else "other"
        metrics = self.state.metrics
        if path not in PUBLIC_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not authorized(header or None, self.state.settings.api_keys):
                response = error_response(401, "invalid_request_error", "invalid_api_key",
                                          "a valid API key is required: 'Authorization: "
                                          "Bearer <key>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                metrics.observe_request(label, 401)
                return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # A scrape of /metrics (or a health probe) is not work in flight: counted, every
        # reading of the gauge would include the request reading it.
        counted = path not in UNCOUNTED_PATHS
        metrics.in_flight += counted
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics.in_flight -= counted
            metrics.observe_request(label, status)


# -- errors --------------------------------------------------------------------------------


def error_response(status: int, kind: str, code: str | None, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _classify(error: Exception) -> tuple[int, str, str | None]:
    if isinstance(error, BadRequestError):
        return 400, "invalid_request_error", None
    if isinstance(error, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(error, QueueFullError):
        return 429, "rate_limit_error", "queue_full"
    if isinstance(error, WorkerCrashedError):
        return 500, "server_error", "worker_crashed"
    if isinstance(error, RefusalError):
        return 503, "server_error", "model_refused"
    if isinstance(error, ServeError):
        return 503, "server_error", "model_unavailable"
    return 500, "server_error", None


def _error_body(error: Exception) -> dict[str, Any]:
    _, kind, code = _classify(error)
    return {"error": {"message": str(error), "type": kind, "param": None, "code": code}}


async def _on_error(request: Request, error: Exception) -> Response:
    status, kind, code = _classify(error)
    if ollama.is_ollama_path(request.url.path):  # Ollama's error shape
        return JSONResponse({"error": str(error)}, status_code=status)
    response = error_response(status, kind, code, str(error))
    if status == 429:
        response.headers["Retry-After"] = "1"
    if code == "worker_crashed":
        # The same request would likely crash the new worker too: tell OpenAI's clients,
        # which retry 5xx by default, not to.
        response.headers["x-should-retry"] = "false"
    return response


async def _on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    message = f"{request.method} {request.url.path}: {error.detail}"
    return error_response(error.status_code, kind, None, message)


async def _on_bug(request: Request, error: Exception) -> Response:
    log.exception("internal error answering %s %s", request.method, request.url.path)
    return error_response(500, "server_error", None, f"internal error: {type(error).__name__}")


def _worker_error(message: tuple[Any, ...]) -> ApplianceError:
    _, _, kind, text = message
    return BadRequestError(text) if kind == "bad_request" else ApplianceError(text)


# -- routes --------------------------------------------------------------------------------


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.serve
    return state


async def _health(request: Request) -> Response:
    workers = _state(request).workers.values()
    models = {w.name: {"state": w.state, "pid": w.pid,
                       **({"detail": w.detail} if w.detail else {})}
              for w in workers}
    if all(w.state in (READY, UNLOADED) for w in workers):  # unloaded: loads on request
        return JSONResponse({"status": "ok", "models": models})
    loading = any(w.state in ("loading", "restarting") for w in workers)
    return JSONResponse({"status": "loading" if loading else "unavailable", "models": models},
                        status_code=503)


async def _metrics(request: Request) -> Response:
    state = _state(request)
    return Response(state.metrics.render() + await engine_metrics(state.workers),
                    media_type=CONTENT_TYPE)


def _card(state: ServerState, worker: Worker) -> dict[str, Any]:
    card: dict[str, Any] = {"id": worker.name, "object": "model", "created": state.started,
                            "owned_by": "appliance", "status": worker.state}
    if worker.model is not None:
        card["identity"] = worker.model.identity
        card["size"] = worker.model.size
    if worker.info:
        card["meta"] = worker.info
    return card


async def _models(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"object": "list",
                         "data": [_card(state, w) for w in state.workers.values()]})


async def _model(request: Request) -> Response:
    state = _state(request)
    return JSONResponse(_card(state, state.worker_for(request.path_params["model"])))


async def _read_json(request: Request) -> dict[str, Any]:
    limit = _state(request).settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequestError(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequestError(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return protocol.parse_body(b"".join(chunks))


async def _chat(request: Request) -> Response:
    parse = passthrough.parse_chat if _state(request).engine == "llama-server" else (
        protocol.parse_chat)
    generation = parse(await _read_json(request))
    # Without max_tokens llama.cpp generates until the context is full (minutes, thousands of
    # tokens for a base model): the server's cap applies instead.
    generation.params.setdefault("max_tokens", _state(request).settings.max_tokens_default)
    return await _generate(request, "chat", generation)


async def _completions(request: Request) -> Response:
    parse = passthrough.parse_completion if _state(request).engine == "llama-server" else (
        protocol.parse_completion)
    generation = parse(await _read_json(request))
    return await _generate(request, "completion", generation)


async def _embeddings(request: Request) -> Response:
    state = _state(request)
    req = protocol.parse_embedding(await _read_json(request))
    worker = state.worker_for(req.model)
    result: dict[str, Any] = {}
    run = worker.run("embedding", {"input": req.inputs, "model": worker.name})
    try:
        async for message in run:
            if message[0] == "result":
                result = message[2]
            elif message[0] == "error":
                raise _worker_error(message)
    finally:
        await run.aclose()
    if req.encoding_format == "base64":
        for item in result["data"]:
            vector = item["embedding"]
            item["embedding"] = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return JSONResponse(result)


async def _generate(request: Request, op: str, req: protocol.GenerationRequest) -> Response:
    state = _state(request)
    worker = state.worker_for(req.model)
    params = {**req.params, "model": worker.name}
    run = worker.run(op, params)
    if not req.stream:
        return await _unless_disconnected(request, _collect(state, worker.name, run))
    try:
        first = await run.__anext__()
        if first[0] == "error":
            raise _worker_error(first)
    except BaseException:
        await run.aclose()
        raise
    return StreamingResponse(
        _events(state, worker.name, req, first, run),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _collect(state: ServerState, model: str,
                   run: AsyncGenerator[tuple[Any, ...], None]) -> Response:
    result: dict[str, Any] = {}
    try:
        async for message in run:
            if message[0] == "result":
                result = message[2]
            elif message[0] == "error":
                raise _worker_error(message)
            elif message[0] == "done":
                state.metrics.observe_generation(model, message[2])
    finally:
        await run.aclose()
    return JSONResponse(result)


async def _unless_disconnected(request: Request, answer: Coroutine[Any, Any, Response]
                               ) -> Response:
    """Await ``answer`` unless the client leaves first; then cancel it (which cancels the
    generation in the worker, as for a stream) and answer 499, nginx's "client closed"."""
    answering = asyncio.ensure_future(answer)
    leaving = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not answering.done():
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
    if answering.cancelled():
        log.info("client left %s before its answer; generation cancelled", request.url.path)
        return Response(status_code=CLIENT_CLOSED)
    return answering.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _events(
    state: ServerState, model: str, req: protocol.GenerationRequest,
    first: tuple[Any, ...], run: AsyncGenerator[tuple[Any, ...], None],
) -> AsyncIterator[str]:
    message = first
    last: dict[str, Any] = {}
    try:
        while True:
            kind = message[0]
            if kind == "chunk":
                last = message[2]
                yield _event(last)
            elif kind == "done":
                stats = message[2]
                state.metrics.observe_generation(model, stats)
                if req.include_usage:
                    yield _event(_usage_chunk(last, model, stats))
                break
            elif kind == "error":
                yield _event(_error_body(_worker_error(message)))
                break
            message = await run.__anext__()
    except ApplianceError as e:  # the worker died mid-stream: say so in the stream
        yield _event(_error_body(e))
    finally:
        await run.aclose()
    yield "data: [DONE]\n\n"


def _usage_chunk(last: dict[str, Any], model: str, stats: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(stats["prompt_tokens"]), int(stats["completion_tokens"])
    return {
        "id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk"),
        "created": last.get("created", int(time.time())), "model": model, "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }
