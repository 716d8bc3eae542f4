"""A streamed answer folded back into the whole one, as llama-server would have sent it.

Why we stream from llama-server even when the client did not ask for a stream: a non-streamed
request's HTTP thread in llama-server looks at its connection only once a second
(``HTTP_POLLING_SECONDS``), so a client that gives up holds its slot for up to a second more;
a streamed one is cancelled at its next token, when the write fails. Streaming inside and
folding here keeps the "abandoned requests stop within a token" rule for every request.

The fold is the inverse of the OpenAI streaming format and nothing more: text and
``delta.content`` / ``reasoning_content`` are joined, ``tool_calls`` deltas are merged by their
``index`` (the id, type and name come once; the arguments arrive in pieces), list-valued
``logprobs`` fields are concatenated, and the last ``finish_reason`` wins. What the pieces
mean (tool-call parsing, grammars, sampling) stays llama.cpp's.
"""

from __future__ import annotations

from typing import Any

_WHOLE_OBJECT = {"chat.completion.chunk": "chat.completion"}


class Folded:
    """Chunks in, one non-streamed payload out (``payload()``)."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: dict[str, Any] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        if not self._head:
            self._head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint",
                                                "object") if k in chunk}
        for key in ("usage", "timings"):
            if chunk.get(key):
                self._usage[key] = chunk[key]
        for piece in chunk.get("choices") or []:
            index = int(piece.get("index", 0))
            choice = self._choices.setdefault(index, {"index": index, "finish_reason": None})
            if piece.get("finish_reason") is not None:
                choice["finish_reason"] = piece["finish_reason"]
            if piece.get("logprobs"):
                _extend_logprobs(choice, piece["logprobs"])
            if "delta" in piece:
                _add_delta(choice.setdefault("message", {"role": "assistant"}), piece["delta"])
            elif "text" in piece:
                choice["text"] = choice.get("text", "") + (piece["text"] or "")

    def payload(self) -> dict[str, Any]:
        head = dict(self._head)
        head["object"] = _WHOLE_OBJECT.get(head.get("object", ""), head.get("object",
                                                                            "text_completion"))
        choices = []
        for index in sorted(self._choices):
            choice = dict(self._choices[index])
            if "message" in choice:
                choice["message"] = _finished_message(choice["message"])
            choice.setdefault("logprobs", None)
            choices.append(choice)
        return {**head, "choices": choices, **self._usage}


def _add_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    if delta.get("role"):
        message["role"] = delta["role"]
    for key in ("content", "reasoning_content"):
        if delta.get(key) is not None:
            message[key] = message.get(key, "") + delta[key]
    for call in delta.get("tool_calls") or []:
        calls = message.setdefault("tool_calls", {})
        whole = calls.setdefault(int(call.get("index", len(calls))),
                                 {"type": "function", "function": {"name": "", "arguments": ""}})
        for key in ("id", "type"):
            if call.get(key):
                whole[key] = call[key]
        function = call.get("function") or {}
        if function.get("name"):
            whole["function"]["name"] += function["name"]
        if function.get("arguments"):
            whole["function"]["arguments"] += function["arguments"]


def _finished_message(message: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    calls = out.pop("tool_calls", None)
    if calls:
        out["tool_calls"] = [calls[i] for i in sorted(calls)]
    out.setdefault("content", None if calls else "")
    return out


def _extend_logprobs(choice: dict[str, Any], piece: dict[str, Any]) -> None:
    whole = choice.setdefault("logprobs", {})
    for key, value in piece.items():
        if isinstance(value, list):
            whole[key] = [*whole.get(key, []), *value]
        else:
            whole[key] = value
