"""What a receipt's digests are over, defined once for the server, the verifier and replay.

Pure: bytes and JSON values in, digests out.

- **request**: SHA-256 of the exact request body bytes the client sent (``curl -d @FILE``
  sends FILE's bytes: ``receipt verify --request FILE`` checks them).
- **response**: SHA-256 of the canonical JSON (``format.receipt.canonical``) of the response
  with every top-level ``receipt`` field removed. A non-streamed answer is one JSON document;
  a stream is the JSON array of its events in order (the ``data:`` payloads of server-sent
  events but ``[DONE]``, or the lines of Ollama's NDJSON), the receipt-carrying event
  included without its ``receipt``. So whatever a client saved (the body as received, or the
  raw stream) hashes to the receipt's digest; spacing and key order do not matter, one
  changed character does.
- **answer**: SHA-256 of the canonical answer (``answer``): per choice its text, finish
  reason and tool calls (name and arguments, no ids), with stream deltas joined. Ids and
  timestamps differ on every run, so this is what a replay compares.

The seed: a request that names none gets one chosen by the server (``with_seed``), recorded in
the receipt, so seeded sampling can be replayed; replay puts the same seed into the request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from appliance.errors import FormatError, LimitExceededError
from appliance.format import fields
from appliance.format.receipt import canonical

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a saved response read back to verify it
MAX_EVENTS = 1 << 20
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
OLLAMA_PATHS = frozenset({"/api/chat", "/api/generate"})
# Ollama option -> the OpenAI field name a receipt records it under.
_OLLAMA_NAMES = {"num_predict": "max_tokens"}


def api_of(path: str) -> str | None:
    """``openai`` or ``ollama`` for a path that answers with generated text; else None."""
    if path in OPENAI_PATHS:
        return "openai"
    if path in OLLAMA_PATHS:
        return "ollama"
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- requests -------------------------------------------------------------------------------


def request_params(api: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields of a request body, under OpenAI's names."""
    if api == "openai":
        return dict(body)
    options = body.get("options")
    if not isinstance(options, dict):
        return {}
    return {_OLLAMA_NAMES.get(str(k), str(k)): v for k, v in options.items()}


def request_seed(api: str, body: Mapping[str, Any]) -> Any:
    return request_params(api, body).get("seed")


def with_seed(api: str, body: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """``body`` with ``seed`` set where its API reads one (OpenAI: ``seed``; Ollama:
    ``options.seed``)."""
    out = dict(body)
    if api == "openai":
        out["seed"] = seed
    else:
        options = out.get("options")
        out["options"] = {**(options if isinstance(options, dict) else {}), "seed": seed}
    return out


# -- responses ------------------------------------------------------------------------------


def without_receipt(document: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != "receipt"}


def response_sha256(documents: list[dict[str, Any]], stream: bool) -> str:
    bare = [without_receipt(d) for d in documents]
    if not stream:
        if len(bare) != 1:
            raise FormatError(f"a non-streamed response is one JSON document, not {len(bare)}")
        return sha256(canonical(bare[0]))
    return sha256(canonical(bare))


def parse_response(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """A saved response: one JSON document, server-sent events or NDJSON lines. Returns
    (documents, stream). FormatError when it is none of them."""
    if len(data) > MAX_RESPONSE_BYTES:
        raise LimitExceededError(f"the response is {len(data)} bytes, over the cap of "
                                 f"{MAX_RESPONSE_BYTES}")
    stripped = data.strip()
    if stripped.startswith(b"data:") or b"\ndata:" in stripped[:4096]:
        return _sse(stripped), True
    lines = [line for line in stripped.split(b"\n") if line.strip()]
    if len(lines) == 1:
        return [_document(lines[0], "the response")], False
    try:  # a pretty-printed single document spans lines
        return [_document(stripped, "the response")], False
    except FormatError:
        pass
    if len(lines) > MAX_EVENTS:
        raise LimitExceededError(f"the response has {len(lines)} lines, over the cap")
    return [_document(line, f"response line {i + 1}") for i, line in enumerate(lines)], True


def _document(data: bytes, what: str) -> dict[str, Any]:
    return fields.json_object(data, what, max_bytes=MAX_RESPONSE_BYTES)


def _sse(data: bytes) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        payload = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n")
                             if line.startswith(b"data:"))
        if not payload or payload.strip() == b"[DONE]":
            continue
        if len(events) >= MAX_EVENTS:
            raise LimitExceededError("the stream has too many events")
        events.append(_document(payload, f"stream event {len(events) + 1}"))
    if not events:
        raise FormatError("the stream holds no event")
    return events


# -- the answer -----------------------------------------------------------------------------


def answer(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """The generated answer in one canonical shape, whatever the API and streaming."""
    choices: dict[int, dict[str, Any]] = {}

    def choice(index: Any) -> dict[str, Any]:
        key = index if type(index) is int else 0
        return choices.setdefault(key, {"index": key, "text": "", "finish_reason": None,
                                        "tool_calls": {}})

    for doc in documents:
        if isinstance(doc.get("choices"), list):  # OpenAI, whole or streamed
            for raw in doc["choices"]:
                if not isinstance(raw, dict):
                    continue
                c = choice(raw.get("index", 0))
                part = raw.get("message") or raw.get("delta")
                if isinstance(part, dict):
                    c["text"] += _text(part.get("content"))
                    _calls(c["tool_calls"], part.get("tool_calls"))
                else:
                    c["text"] += _text(raw.get("text"))
                c["finish_reason"] = raw.get("finish_reason") or c["finish_reason"]
        elif "message" in doc or "response" in doc:  # Ollama
            c = choice(0)
            message = doc.get("message")
            if isinstance(message, dict):
                c["text"] += _text(message.get("content"))
                _calls(c["tool_calls"], message.get("tool_calls"))
            else:
                c["text"] += _text(doc.get("response"))
            if doc.get("done"):
                c["finish_reason"] = doc.get("done_reason")
    out = []
    for index in sorted(choices):
        c = choices[index]
        calls = [c["tool_calls"][k] for k in sorted(c["tool_calls"])]
        out.append({**c, "tool_calls": calls})
    return {"choices": out}


def answer_sha256(documents: list[dict[str, Any]]) -> str:
    return sha256(canonical(answer(documents)))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _calls(into: dict[int, dict[str, Any]], raw: Any) -> None:
    """Tool calls by position; streamed deltas append their argument pieces."""
    if not isinstance(raw, list):
        return
    for n, call in enumerate(raw):
        if not isinstance(call, dict):
            continue
        index = call.get("index", n) if type(call.get("index", n)) is int else n
        raw_function = call.get("function")
        function: dict[str, Any] = raw_function if isinstance(raw_function, dict) else {}
        entry = into.setdefault(index, {"name": "", "arguments": ""})
        if isinstance(function.get("name"), str):
            entry["name"] = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            entry["arguments"] += arguments
        elif arguments is not None:  # Ollama gives an object
            entry["arguments"] = canonical(arguments).decode("ascii")
