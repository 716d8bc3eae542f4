"""OpenAI request bodies in, llama-cpp-python keyword arguments out (pure: no I/O).

Requests are untrusted: the body is size-capped before parsing and read by
``appliance.format.fields.json_object`` (a repeated key or nesting past ``MAX_JSON_DEPTH`` is a
400, never a 500 from a ``RecursionError``), every field is
type- and range-checked, and an argument this server does not know is refused with a 400, as
OpenAI itself does ("Unrecognized request argument"). Errors are ``BadRequestError``; the HTTP
layer turns them into OpenAI's error shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.errors import BadRequestError
from appliance.format import fields

MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 256
# No OpenAI request nests deeper than ~5 (messages -> content parts -> text); 32 leaves room.
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Accepted and ignored: they change nothing for a local single-choice server.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_SAMPLING = {
    # name: (type, min, max)
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "min_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 1 << 20),
    "presence_penalty": (float, -2.0, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "repeat_penalty": (float, 0.0, 10.0),
    "seed": (int, -(1 << 63), (1 << 64) - 1),
}


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat or text completion request."""

    model: str | None
    stream: bool
    include_usage: bool
    params: dict[str, Any]  # keyword arguments for create_chat_completion / create_completion


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str | None
    inputs: list[str]
    encoding_format: str  # "float" or "base64"


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body (the caller has already capped its size)."""
    return fields.json_object(raw, "the request body", max_bytes=len(raw),
                              error=BadRequestError)


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    known = {"model", "messages", "stream", "stream_options", "n", "max_tokens",
             "max_completion_tokens", "stop", "logit_bias", "response_format", "logprobs",
             "tools", "tool_choice", *_SAMPLING, *_IGNORED}
    _reject_unknown(body, known)
    params = _common(body)
    params["messages"] = _messages(body.get("messages"))
    max_tokens = _max_tokens(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens")
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise BadRequestError("tools and tool_choice are not supported by this server")
    if body.get("logprobs"):
        raise BadRequestError("logprobs is not supported by this server")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise BadRequestError("only response_format {'type': 'text'} is supported")
    return _generation(body, params)


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    known = {"model", "prompt", "stream", "stream_options", "n", "max_tokens", "stop",
             "logit_bias", "echo", "suffix", "logprobs", "best_of", *_SAMPLING, *_IGNORED}
    _reject_unknown(body, known)
    params = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequestError("'prompt' must be a string (or a list of exactly one string)")
    params["prompt"] = prompt
    max_tokens = _max_tokens(body, "max_tokens")
    params["max_tokens"] = 16 if max_tokens is None else max_tokens  # OpenAI's default
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequestError("'echo' must be a boolean")
    if echo:
        params["echo"] = True
    if body.get("suffix") is not None:
        raise BadRequestError("'suffix' (fill-in-the-middle) is not supported by this server")
    if body.get("logprobs") is not None:
        raise BadRequestError("logprobs is not supported by this server")
    if body.get("best_of") not in (None, 1):
        raise BadRequestError("only best_of=1 is supported")
    return _generation(body, params)


def parse_embedding(body: dict[str, Any]) -> EmbeddingRequest:
    _reject_unknown(body, {"model", "input", "encoding_format", "dimensions", "user"})
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(inputs, list)
        or not inputs
        or not all(isinstance(item, str) and item for item in inputs)
    ):
        raise BadRequestError("'input' must be a non-empty string or a list of non-empty strings")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise BadRequestError(f"'input' holds {len(inputs)} items; at most "
                              f"{MAX_EMBEDDING_INPUTS} per request")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequestError("'encoding_format' must be 'float' or 'base64'")
    if body.get("dimensions") is not None:
        raise BadRequestError("'dimensions' is not supported: embeddings have the model's size")
    return EmbeddingRequest(_model(body), inputs, encoding)


def _reject_unknown(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequestError(f"unrecognized request argument: {', '.join(unknown)}")


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BadRequestError("'model' must be a non-empty string")
    return model


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """Sampling, stop and logit_bias arguments shared by chat and text completions."""
    params: dict[str, Any] = {}
    for name, (kind, low, high) in _SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and not isinstance(value, int)
        ):
            raise BadRequestError(f"'{name}' must be a {kind.__name__}")
        if not low <= value <= high:
            raise BadRequestError(f"'{name}' must be between {low} and {high}")
        params[name] = kind(value)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise BadRequestError("'stop' must be a string or a list of non-empty strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise BadRequestError(f"'stop' holds at most {MAX_STOP_SEQUENCES} sequences")
        params["stop"] = stops
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadRequestError("'logit_bias' must map token ids to numbers")
        try:
            params["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError) as e:
            raise BadRequestError("'logit_bias' must map token ids to numbers") from e
        if any(not -100.0 <= v <= 100.0 for v in params["logit_bias"].values()):
            raise BadRequestError("'logit_bias' values must be between -100 and 100")
    if body.get("n") not in (None, 1):
        raise BadRequestError("only n=1 is supported")
    return params


def _max_tokens(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequestError(f"'{name}' must be a positive integer")
    return value


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("'messages' must be a non-empty list")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequestError(f"messages[{i}] must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise BadRequestError(f"messages[{i}].role must be one of {sorted(_ROLES)}")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(message.get("content"), i)})
    return messages


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a content list joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequestError(f"messages[{i}].content: only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequestError(f"messages[{i}].content: a text part needs 'text'")
            texts.append(text)
        return "".join(texts)
    raise BadRequestError(f"messages[{i}].content must be a string or a list of parts")


def _generation(body: dict[str, Any], params: dict[str, Any]) -> GenerationRequest:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise BadRequestError("'stream_options' may only hold 'include_usage'")
        include_usage = bool(options.get("include_usage", False))
    params["stream"] = stream
    return GenerationRequest(_model(body), stream, include_usage, params)
