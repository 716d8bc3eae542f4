"""Forced tool calls for chat templates that know no tools, through llama.cpp's JSON grammars.

llama-server renders tools with the model's own chat template and parses the calls back
(``--jinja``), but only for templates that describe tools; a template without them (the tiny
test model's ChatML, the gemma-3-270m GGUF on PyPI) gets no tool-call grammar at all, and
llama-server takes ``tool_choice`` only as ``auto``/``none``/``required``. So:

- a template that describes tools: a named ``tool_choice`` becomes ``required`` over that one
  function; everything else goes to llama-server as it is;
- a template that does not, with ``required`` or a named function: the request becomes a
  ``response_format`` JSON schema (``{"name": <one of the functions>, "arguments": <its
  parameters schema>}``), which llama.cpp compiles into a grammar, and the constrained answer
  becomes the ``tool_calls`` message. The arguments therefore always parse and match the
  schema. With ``auto``/``none`` such a model answers in text (the tools are dropped).

Only the request and the answer's envelope are translated here; sampling, grammar and
parsing of JSON stay llama.cpp's.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    body: dict[str, Any]  # what llama-server gets
    generic: bool  # the answer is a JSON object to turn into tool_calls


def plan(body: dict[str, Any], template_has_tools: bool) -> Plan:
    tools = body.get("tools")
    if not tools:
        return Plan(body, False)
    choice = body.get("tool_choice", "auto")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    chosen = [t for t in tools if named is None or t["function"]["name"] == named]
    if template_has_tools:
        if named is not None:
            return Plan({**body, "tools": chosen, "tool_choice": "required"}, False)
        return Plan(body, False)
    out = {k: v for k, v in body.items()
           if k not in ("tools", "tool_choice", "parallel_tool_calls")}
    if choice in ("auto", "none"):
        return Plan(out, False)
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}}}
               for t in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    names = ", ".join(t["function"]["name"] + (f" ({t['function']['description']})"
                                                if t["function"].get("description") else "")
                      for t in chosen)
    hint = {"role": "system", "content": f"Answer with a call of one function: {names}."}
    out["messages"] = [hint, *body["messages"]]
    out["response_format"] = {"type": "json_schema",
                              "json_schema": {"name": "tool_call", "schema": schema}}
    return Plan(out, True)


def as_tool_call(result: dict[str, Any]) -> dict[str, Any]:
    """Turn a generic answer's ``{"name", "arguments"}`` content into a ``tool_calls`` reply."""
    for choice in result.get("choices") or []:
        message = choice.get("message") or {}
        try:
            call = json.loads(message.get("content") or "")
        except ValueError:
            continue  # cut short by max_tokens: no call to report, the text stays
        if not isinstance(call, dict) or "name" not in call:
            continue
        choice["message"] = {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{secrets.token_hex(8)}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments"))},
        }]}
        choice["finish_reason"] = "tool_calls"
    return result


def as_chunks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A non-streamed reply as the chunks a stream of it would have been."""
    base = {"id": result.get("id", ""), "object": "chat.completion.chunk",
            "created": result.get("created", 0), "model": result.get("model", "")}
    chunks = []
    for choice in result.get("choices") or []:
        message = dict(choice.get("message") or {})
        calls = message.pop("tool_calls", None)
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        chunks.append({**base, "choices": [{"index": choice.get("index", 0), "delta": delta,
                                            "finish_reason": None}]})
        chunks.append({**base, "choices": [{"index": choice.get("index", 0), "delta": {},
                                            "finish_reason": choice.get("finish_reason")}]})
    return chunks
