"""OpenAI request bodies for the llama-server engine: what we check, what llama-server does.

``protocol`` checks the fields both engines share (sampling, stop, max_tokens, stream, ...).
On top of it, for llama-server, this module type-checks and passes on what llama-server
implements itself and must not be re-implemented here: ``tools`` and ``tool_choice`` (auto,
none, required, a named function: llama.cpp's chat-template tool-call parsers and grammars;
``serve/tool_calls.py`` adapts the request for templates that know no tools),
``response_format`` (json_object, json_schema: a grammar from the schema), ``logprobs`` and
``top_logprobs``, and the tool-calling message fields (an assistant's ``tool_calls``, a tool
answer's ``tool_call_id``). A field neither knows (``cache_prompt``, ``reasoning_effort``,
...: what common clients add) is dropped and logged once per field name instead of refused.
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.errors import BadRequestError
from appliance.serve import protocol

log = logging.getLogger("appliance.serve")

_CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
    "stop", "logit_bias", "temperature", "top_p", "min_p", "top_k", "presence_penalty",
    "frequency_penalty", "repeat_penalty", "seed", "user", "metadata", "store", "service_tier",
})
_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "stream", "stream_options", "n", "max_tokens", "stop", "logit_bias",
    "echo", "best_of", "temperature", "top_p", "min_p", "top_k", "presence_penalty",
    "frequency_penalty", "repeat_penalty", "seed", "user", "metadata", "store", "service_tier",
})
_CHAT_PASSED = frozenset({"tools", "tool_choice", "response_format", "logprobs", "top_logprobs",
                          "parallel_tool_calls"})
_COMPLETION_PASSED = frozenset({"logprobs", "response_format"})
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id",
                             "reasoning_content", "refusal"})
MAX_TOP_LOGPROBS = 20  # OpenAI's cap
_logged: set[str] = set()


def parse_chat(body: dict[str, Any]) -> protocol.GenerationRequest:
    passed = _split(body, _CHAT_FIELDS, _CHAT_PASSED)
    shared = {k: v for k, v in body.items() if k in _CHAT_FIELDS}
    request = protocol.parse_chat(shared)
    request.params["messages"] = _messages(body.get("messages"))
    request.params.update(_checked_chat(passed))
    return request


def parse_completion(body: dict[str, Any]) -> protocol.GenerationRequest:
    passed = _split(body, _COMPLETION_FIELDS, _COMPLETION_PASSED)
    shared = {k: v for k, v in body.items() if k in _COMPLETION_FIELDS}
    request = protocol.parse_completion(shared)
    request.params.pop("echo", None)  # llama-server has no echo: say nothing rather than lie
    logprobs = passed.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not (
                0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise BadRequestError(f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        request.params["logprobs"] = logprobs
    if "response_format" in passed:
        request.params["response_format"] = _response_format(passed["response_format"])
    return request


def _split(body: dict[str, Any], shared: frozenset[str], passed: frozenset[str]
           ) -> dict[str, Any]:
    unknown = sorted(set(body) - shared - passed)
    fresh = [name for name in unknown if name not in _logged]
    if fresh:
        _logged.update(fresh)
        log.info("ignoring request field(s) this server does not use: %s (logged once)",
                 ", ".join(fresh))
    return {k: body[k] for k in passed if body.get(k) is not None}


def _checked_chat(passed: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tools = passed.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(_is_tool(t) for t in tools):
            raise BadRequestError("'tools' must be a list of {'type': 'function', 'function': "
                                  "{'name': ..., 'parameters': {...}}}")
        out["tools"] = tools
    choice = passed.get("tool_choice")
    if choice is not None:
        named = (isinstance(choice, dict) and choice.get("type") == "function"
                 and isinstance(choice.get("function"), dict)
                 and isinstance(choice["function"].get("name"), str))
        if choice not in ("auto", "none", "required") and not named:
            raise BadRequestError("'tool_choice' must be 'auto', 'none', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}")
        if choice != "none" and not tools:
            raise BadRequestError("'tool_choice' needs 'tools'")
        if named and choice["function"]["name"] not in {t["function"]["name"]
                                                        for t in tools or []}:
            raise BadRequestError(f"'tool_choice' names the function "
                                  f"{choice['function']['name']!r}, which is not in 'tools'")
        out["tool_choice"] = choice
    if "parallel_tool_calls" in passed:
        if not isinstance(passed["parallel_tool_calls"], bool):
            raise BadRequestError("'parallel_tool_calls' must be a boolean")
        out["parallel_tool_calls"] = passed["parallel_tool_calls"]
    if "response_format" in passed:
        out["response_format"] = _response_format(passed["response_format"])
    logprobs = passed.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, bool):
            raise BadRequestError("'logprobs' must be a boolean")
        out["logprobs"] = logprobs
    top = passed.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequestError(f"'top_logprobs' must be an integer from 0 to "
                                  f"{MAX_TOP_LOGPROBS}")
        if not logprobs:
            raise BadRequestError("'top_logprobs' needs 'logprobs': true")
        out["top_logprobs"] = top
    return out


def _is_tool(tool: Any) -> bool:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return False
    function = tool.get("function")
    return (isinstance(function, dict) and isinstance(function.get("name"), str)
            and bool(function["name"])
            and isinstance(function.get("parameters", {}), dict))


def _response_format(value: Any) -> dict[str, Any]:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadRequestError("response_format json_schema needs 'json_schema': "
                                  "{'name': ..., 'schema': {...}}")
        return {"type": "json_schema", "json_schema": spec}
    raise BadRequestError("'response_format' type must be 'text', 'json_object' or "
                          "'json_schema'")


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Messages with their tool-calling fields (``protocol`` already checked role/content)."""
    assert isinstance(raw, list)
    out = []
    for i, message in enumerate(raw):
        extra = set(message) - _MESSAGE_FIELDS
        if extra:
            raise BadRequestError(f"messages[{i}] has unknown field(s) {sorted(extra)}")
        item: dict[str, Any] = {
            "role": "system" if message["role"] == "developer" else message["role"],
            "content": protocol._content(message.get("content"), i),
        }
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                raise BadRequestError(f"messages[{i}].tool_calls must be an assistant's list "
                                      "of {'id', 'type': 'function', 'function': {...}}")
            item["tool_calls"] = calls
        for name in ("tool_call_id", "name"):
            if message.get(name) is not None:
                if not isinstance(message[name], str):
                    raise BadRequestError(f"messages[{i}].{name} must be a string")
                item[name] = message[name]
        out.append(item)
    return out
