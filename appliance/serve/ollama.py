"""Ollama's API on the serving port, so the ``ollama`` client and Open WebUI work unchanged.

Routes (https://github.com/ollama/ollama/blob/main/docs/api.md): ``GET /api/version``,
``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``POST /api/chat``,
``POST /api/generate``, ``POST /api/embed`` (and the older ``/api/embeddings``). Chat and
generate stream by default as Ollama does: one JSON object per line (NDJSON), the last with
``"done": true`` and the token counts and durations (nanoseconds). ``pull``, ``push``,
``create``, ``copy`` and ``delete`` answer 403 with the reason: models arrive through signed
bundles, never from here.

A request is translated into the OpenAI request the ``/v1`` routes take, checked by the same
parser, and run on the same worker (same queue, verify-before-load, crash handling); only the
shapes differ. Errors are Ollama's ``{"error": "..."}`` with the status the ``/v1`` routes use.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from appliance.errors import ApplianceError, BadRequestError, ModelNotFoundError
from appliance.serve import passthrough, protocol
from appliance.serve.state import ServerState

if TYPE_CHECKING:
    from appliance.serve.supervisor import Worker

# The Ollama API version these routes follow (clients check it is recent enough).
OLLAMA_VERSION = "0.12.0"
_OPTIONS = {  # Ollama option -> OpenAI field
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "num_predict": "max_tokens",
}
_REFUSED = ("pull", "push", "create", "copy", "delete", "blobs/{digest:path}")
NDJSON = "application/x-ndjson"


def routes() -> list[Route]:
    refused = [Route(f"/api/{name}", _refuse, methods=["POST", "DELETE", "HEAD"])
               for name in _REFUSED]
    return [
        Route("/api/version", _version, methods=["GET"]),
        Route("/api/tags", _tags, methods=["GET"]),
        Route("/api/ps", _ps, methods=["GET"]),
        Route("/api/show", _show, methods=["POST"]),
        Route("/api/chat", _chat, methods=["POST"]),
        Route("/api/generate", _generate, methods=["POST"]),
        Route("/api/embed", _embed, methods=["POST"]),
        Route("/api/embeddings", _embeddings_legacy, methods=["POST"]),
        *refused,
    ]


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.serve
    return state


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def _version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


async def _refuse(request: Request) -> Response:
    return JSONResponse({"error": f"{request.url.path} is not available here: models arrive "
                                  "through signed bundles (appliance import), and only "
                                  "verified store models are served"}, status_code=403)


def _details(worker: Worker) -> dict[str, Any]:
    family = str(worker.info.get("architecture") or "")
    params = int(worker.info.get("n_params") or 0)
    return {"parent_model": "", "format": "gguf", "family": family,
            "families": [family] if family else [],
            "parameter_size": f"{params / 1e6:.0f}M" if params else "",
            "quantization_level": ""}


def _entry(state: ServerState, worker: Worker) -> dict[str, Any]:
    model = worker.model
    return {"name": worker.name, "model": worker.name,
            "modified_at": datetime.fromtimestamp(state.started, UTC).isoformat(),
            "size": model.size if model else 0,
            "digest": model.identity if model else "",
            "details": _details(worker)}


async def _tags(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"models": [_entry(state, w) for w in state.workers.values()]})


async def _ps(request: Request) -> Response:
    state = _state(request)
    keep = state.settings.keep_alive
    loaded = []
    for worker in state.workers.values():
        if worker.state not in ("ready", "loading"):
            continue
        last = getattr(worker, "last_used", 0.0) or time.monotonic()
        expires = (datetime.now(UTC) + timedelta(seconds=keep - (time.monotonic() - last))
                   if keep is not None and keep >= 0 else datetime(9999, 1, 1, tzinfo=UTC))
        loaded.append({**_entry(state, worker), "expires_at": expires.isoformat(),
                       "size_vram": 0, "context_length": worker.info.get("n_ctx", 0)})
    return JSONResponse({"models": loaded})


def _worker(state: ServerState, name: Any) -> Worker:
    if not isinstance(name, str) or not name:
        raise BadRequestError("'model' is required")
    try:
        return state.worker_for(name)
    except ModelNotFoundError:
        if name.endswith(":latest"):
            return state.worker_for(name[: -len(":latest")])
        raise


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > _state(request).settings.max_request_bytes:
        raise BadRequestError("the request body is too large")
    return protocol.parse_body(raw)


async def _show(request: Request) -> Response:
    state = _state(request)
    body = await _body(request)
    worker = _worker(state, body.get("model") or body.get("name"))
    info = worker.info
    capabilities = ["embedding"] if info.get("embeddings") else ["completion", "tools"]
    return JSONResponse({
        "modelfile": "", "parameters": "", "template": "", "license": "",
        "details": _details(worker),
        "model_info": {f"{info.get('architecture', 'general')}.{k}": v
                       for k, v in info.items() if isinstance(v, int | str)},
        "capabilities": capabilities,
        "modified_at": _entry(state, worker)["modified_at"],
    })


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequestError("'options' must be an object")
    out = {_OPTIONS[k]: v for k, v in options.items() if k in _OPTIONS}
    if isinstance(out.get("max_tokens"), int) and out["max_tokens"] < 0:
        del out["max_tokens"]  # -1 (forever) and -2 (fill the context): the server's cap
    return out


def _format(value: Any) -> dict[str, Any] | None:
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": value}}
    raise BadRequestError("'format' must be 'json' or a JSON schema")


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise BadRequestError("'messages' must be a list")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequestError(f"messages[{i}] must be an object")
        if message.get("images"):
            raise BadRequestError("images are not supported by this server")
        item: dict[str, Any] = {"role": message.get("role"), "content": message.get("content")}
        calls = message.get("tool_calls")
        if calls:
            item["tool_calls"] = [
                {"id": f"call_{i}_{n}", "type": "function",
                 "function": {"name": c.get("function", {}).get("name"),
                              "arguments": json.dumps(c.get("function", {}).get("arguments"))}}
                for n, c in enumerate(calls) if isinstance(c, dict)]
        if isinstance(message.get("tool_name"), str):
            item["name"] = message["tool_name"]
        out.append(item)
    return out


def _parse(state: ServerState, openai_body: dict[str, Any], chat: bool
           ) -> protocol.GenerationRequest:
    llama_server = state.engine == "llama-server"
    if chat:
        parse = passthrough.parse_chat if llama_server else protocol.parse_chat
    else:
        parse = passthrough.parse_completion if llama_server else protocol.parse_completion
    request = parse(openai_body)
    request.params.setdefault("max_tokens", state.settings.max_tokens_default)
    return request


async def _chat(request: Request) -> Response:
    state = _state(request)
    body = await _body(request)
    worker = _worker(state, body.get("model"))
    openai_body: dict[str, Any] = {"model": worker.name,
                                   "messages": _messages(body.get("messages")), **_options(body)}
    if body.get("tools"):
        openai_body["tools"] = body["tools"]
    fmt = _format(body.get("format"))
    if fmt is not None:
        openai_body["response_format"] = fmt
    stream = body.get("stream", True) is not False
    if not body.get("messages"):  # Ollama's "load the model" request
        return await _loaded_only(worker, "message", stream)
    return await _answer(state, worker, "chat", _parse(state, openai_body, True), stream,
                         bool(body.get("tools")))


async def _generate(request: Request) -> Response:
    state = _state(request)
    body = await _body(request)
    worker = _worker(state, body.get("model"))
    prompt = body.get("prompt") or ""
    stream = body.get("stream", True) is not False
    if not prompt:  # Ollama's "load the model" request
        return await _loaded_only(worker, "response", stream)
    if body.get("images"):
        raise BadRequestError("images are not supported by this server")
    openai_body: dict[str, Any] = {"model": worker.name, **_options(body)}
    fmt = _format(body.get("format"))
    if fmt is not None:
        openai_body["response_format"] = fmt
    if body.get("raw"):
        openai_body["prompt"] = prompt
        return await _answer(state, worker, "completion", _parse(state, openai_body, False),
                             stream, False, field="response")
    system = body.get("system")
    messages = ([{"role": "system", "content": system}] if isinstance(system, str) else [])
    openai_body["messages"] = [*messages, {"role": "user", "content": prompt}]
    return await _answer(state, worker, "chat", _parse(state, openai_body, True), stream, False,
                         field="response")


async def _loaded_only(worker: Worker, field: str, stream: bool) -> Response:
    # Any request loads the model; the smallest one that says nothing.
    run = (worker.run("embedding", {"input": [" "], "model": worker.name})
           if worker.info.get("embeddings")
           else worker.run("completion", {"prompt": " ", "max_tokens": 1, "stream": False}))
    try:
        async for _message in run:
            pass
    finally:
        await run.aclose()
    empty: Any = {"role": "assistant", "content": ""} if field == "message" else ""
    return JSONResponse({"model": worker.name, "created_at": _now(), field: empty,
                         "done": True, "done_reason": "load"})


def _piece(worker: Worker, field: str, text: str, calls: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    if field == "message":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {"model": worker.name, "created_at": _now(), "message": message, "done": False}
    return {"model": worker.name, "created_at": _now(), "response": text, "done": False}


def _final(worker: Worker, field: str, reason: str, stats: dict[str, Any], started: float
           ) -> dict[str, Any]:
    done = _piece(worker, field, "")
    ttft = float(stats.get("time_to_first_token", 0.0))
    done.update({
        "done": True, "done_reason": "length" if reason == "length" else "stop",
        "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
        "prompt_eval_count": int(stats.get("prompt_tokens", 0)),
        "prompt_eval_duration": int(ttft * 1e9),
        "eval_count": int(stats.get("completion_tokens", 0)),
        "eval_duration": int(float(stats.get("generation_seconds", 0.0)) * 1e9),
    })
    return done


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = arguments
        calls.append({"function": {"name": function.get("name"), "arguments": parsed}})
    return calls


async def _answer(state: ServerState, worker: Worker, op: str, req: protocol.GenerationRequest,
                  stream: bool, tools: bool, *, field: str = "message") -> Response:
    # Tool calls are only whole at the end: asked for with tools, the answer is one piece.
    upstream_stream = stream and not tools
    params = {**req.params, "model": worker.name, "stream": upstream_stream}
    started = time.perf_counter()
    run = worker.run(op, params)
    if not upstream_stream:
        result: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        try:
            async for message in run:
                if message[0] == "result":
                    result = message[2]
                elif message[0] == "done":
                    stats = message[2]
                    state.metrics.observe_generation(worker.name, stats)
                elif message[0] == "error":
                    raise _error(message)
        finally:
            await run.aclose()
        choice = (result.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        calls = _tool_calls(choice.get("message") or {})
        piece = _piece(worker, field, text, calls)
        final = _final(worker, field, choice.get("finish_reason") or "stop", stats, started)
        if not stream:
            final[field] = piece[field]
            return JSONResponse(final)
        return StreamingResponse(_lines([piece, final]), media_type=NDJSON)
    try:
        first = await run.__anext__()
        if first[0] == "error":
            raise _error(first)
    except BaseException:
        await run.aclose()
        raise
    return StreamingResponse(_stream(state, worker, field, first, run, started),
                             media_type=NDJSON)


async def _lines(items: list[dict[str, Any]]) -> AsyncIterator[str]:
    for item in items:
        yield json.dumps(item) + "\n"


async def _stream(state: ServerState, worker: Worker, field: str, first: tuple[Any, ...],
                  run: AsyncGenerator[tuple[Any, ...], None], started: float
                  ) -> AsyncIterator[str]:
    message, reason = first, "stop"
    try:
        while True:
            if message[0] == "chunk":
                choice = (message[2].get("choices") or [{}])[0]
                text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                reason = choice.get("finish_reason") or reason
                if text:
                    yield json.dumps(_piece(worker, field, text)) + "\n"
            elif message[0] == "done":
                state.metrics.observe_generation(worker.name, message[2])
                yield json.dumps(_final(worker, field, reason, message[2], started)) + "\n"
                return
            elif message[0] == "error":
                yield json.dumps({"error": message[3]}) + "\n"
                return
            message = await run.__anext__()
    except ApplianceError as e:  # the worker died mid-stream: say so in the stream
        yield json.dumps({"error": str(e)}) + "\n"
    finally:
        await run.aclose()


def _error(message: tuple[Any, ...]) -> ApplianceError:
    return BadRequestError(message[3]) if message[2] == "bad_request" else ApplianceError(
        message[3])


async def _embed(request: Request) -> Response:
    state = _state(request)
    body = await _body(request)
    worker = _worker(state, body.get("model"))
    raw = body.get("input")
    req = protocol.parse_embedding({"model": worker.name, "input": raw})
    started = time.perf_counter()
    result = await _embedding(worker, req.inputs)
    return JSONResponse({
        "model": worker.name, "embeddings": [item["embedding"] for item in result["data"]],
        "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
        "prompt_eval_count": int((result.get("usage") or {}).get("prompt_tokens", 0)),
    })


async def _embeddings_legacy(request: Request) -> Response:
    state = _state(request)
    body = await _body(request)
    worker = _worker(state, body.get("model"))
    req = protocol.parse_embedding({"model": worker.name, "input": body.get("prompt")})
    result = await _embedding(worker, req.inputs)
    return JSONResponse({"embedding": result["data"][0]["embedding"]})


async def _embedding(worker: Worker, inputs: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    run = worker.run("embedding", {"input": inputs, "model": worker.name})
    try:
        async for message in run:
            if message[0] == "result":
                result = message[2]
            elif message[0] == "error":
                raise _error(message)
    finally:
        await run.aclose()
    return result


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")
