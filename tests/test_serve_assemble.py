"""A streamed answer folded back into the whole one (``appliance.serve.assemble``).

The llama-server engine streams every generation from llama-server, so that a client leaving
stops it at the next token, and folds the stream when the client asked for one piece. The fold
is checked on recorded chunk shapes, and against llama-server's own whole answer for the same
greedy request on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from llama_server_helpers import grammar_ready_tiny
from serve_helpers import running_server, wait_health

from appliance.serve.assemble import Folded
from appliance.serve.engine import NOT_BUILT, find_binary, free_port
from appliance.serve.server import ServerThread
from appliance.tiny_model import EOS_ID

HEAD = {"id": "chatcmpl-1", "created": 7, "model": "m", "system_fingerprint": "b1"}


def _chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {**HEAD, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}


def _fold(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    fold = Folded()
    for chunk in chunks:
        fold.add(chunk)
    return fold.payload()


def test_chat_content_logprobs_and_usage_fold_into_one_message() -> None:
    entry = {"token": "a", "logprob": -1.0, "top_logprobs": []}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    whole = _fold([
        _chat_chunk({"role": "assistant", "content": None}),
        _chat_chunk({"content": "Hel"}, logprobs={"content": [entry]}),
        _chat_chunk({"content": "lo"}, logprobs={"content": [entry]}),
        _chat_chunk({}, "length"),
        {**HEAD, "object": "chat.completion.chunk", "choices": [], "usage": usage,
         "timings": {"predicted_n": 2}},
    ])
    assert whole == {**HEAD, "object": "chat.completion", "usage": usage,
                     "timings": {"predicted_n": 2},
                     "choices": [{"index": 0, "finish_reason": "length",
                                  "logprobs": {"content": [entry, entry]},
                                  "message": {"role": "assistant", "content": "Hello"}}]}


def test_tool_call_deltas_merge_by_index_and_leave_content_null() -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **fields}]}

    whole = _fold([
        _chat_chunk({"role": "assistant", "content": None}),
        _chat_chunk(call(0, id="c0", type="function",
                         function={"name": "get_time", "arguments": ""})),
        _chat_chunk(call(0, function={"arguments": '{"zone": '})),
        _chat_chunk(call(1, id="c1", type="function", function={"name": "f", "arguments": "{}"})),
        _chat_chunk(call(0, function={"arguments": '"UTC"}'})),
        _chat_chunk({}, "tool_calls"),
    ])
    message = whole["choices"][0]["message"]
    assert message["content"] is None and whole["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"] == [
        {"id": "c0", "type": "function",
         "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}},
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
    ]


def test_text_completion_pieces_join() -> None:
    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        return {**HEAD, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    whole = _fold([piece("Once"), piece(" upon"), piece("", "stop")])
    assert whole["object"] == "text_completion"
    assert whole["choices"] == [{"index": 0, "text": "Once upon", "finish_reason": "stop",
                                 "logprobs": None}]


# -- against llama-server's own whole answers -------------------------------------------------

NO_EOS = {str(EOS_ID): -100, str(EOS_ID + 2): -100}
GREEDY = {"temperature": 0, "top_k": 1, "seed": 1, "max_tokens": 12, "logit_bias": NO_EOS}
REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], **GREEDY}),
    ("/v1/completions", {"prompt": "Once upon a time", **GREEDY}),
    ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "a city"}], **GREEDY, "max_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"], "additionalProperties": False}}}}),
]


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grammar_ready_tiny(tiny_gguf, tmp_path_factory.mktemp("fold") / "tiny.gguf")


@pytest.fixture(scope="module")
def direct(tiny: Path) -> Iterator[str]:
    """llama-server itself on the tiny model, asked directly."""
    binary = find_binary()
    if binary is None:
        pytest.skip(NOT_BUILT)
    port = free_port()
    proc = subprocess.Popen([str(binary), "--model", str(tiny), "--port", str(port),
                             "--host", "127.0.0.1", "--ctx-size", "256", "--threads", "2",
                             "--parallel", "1", "--jinja", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, timeout=60)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def front(tiny: Path) -> Iterator[ServerThread]:
    if find_binary() is None:
        pytest.skip(NOT_BUILT)
    with running_server({"tiny": tiny}, engine="llama-server") as server:
        yield server


def _comparable(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in choice.items() if k != "logprobs"} for choice in answer["choices"]]


@pytest.mark.parametrize(("path", "body"), REQUESTS, ids=["chat", "completion", "json-schema"])
def test_a_folded_answer_equals_llama_servers_whole_answer(direct: str, front: ServerThread,
                                                           path: str, body: dict[str, Any]
                                                           ) -> None:
    theirs = httpx.post(f"{direct}{path}", json=body, timeout=60).json()
    ours = httpx.post(f"{front.url}{path}", json={**body, "model": "tiny"}, timeout=60).json()
    assert _comparable(ours) == _comparable(theirs)
    assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"]
    assert ours["object"] == theirs["object"]
    if "response_format" in body:
        assert json.loads(ours["choices"][0]["message"]["content"])["city"] in ("Paris", "Oslo")


def test_a_whole_answer_keeps_the_logprobs_of_tokens_that_add_no_text(direct: str,
                                                                     front: ServerThread
                                                                     ) -> None:
    """Why a whole request with logprobs is asked whole (``llama_server._forward``): every
    token here is <unk> (id 0), which adds no text. llama-server's own whole answer lists
    each one with its logprob; its chat stream sends no chunk for such a token, so a folded
    stream would miss them. Ours must be the whole answer."""
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "seed": 1,
            "logprobs": True, "top_logprobs": 1, "logit_bias": {**NO_EOS, "0": 100}}
    path = "/v1/chat/completions"
    theirs = httpx.post(f"{direct}{path}", json=body, timeout=60).json()
    listed = theirs["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in listed] == ["", "", ""]
    with httpx.stream("POST", f"{direct}{path}", json={**body, "stream": True},
                      timeout=60) as streamed:
        chunks = [json.loads(line.removeprefix("data: ")) for line in streamed.iter_lines()
                  if line.startswith("data: {")]
    in_stream = [entry for chunk in chunks for choice in chunk["choices"]
                 for entry in (choice.get("logprobs") or {}).get("content") or []]
    assert len(in_stream) < 3  # the first rides on the role chunk; the others get no chunk
    ours = httpx.post(f"{front.url}{path}", json={**body, "model": "tiny"}, timeout=60).json()
    assert ours["choices"][0]["logprobs"] == theirs["choices"][0]["logprobs"]
