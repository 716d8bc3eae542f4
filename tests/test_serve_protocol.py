"""Request parsing (pure), API keys, the bounded queue, metrics text, the pre-load file check."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from appliance.errors import (
    BadRequestError,
    IntegrityError,
    QueueFullError,
    TruncatedError,
    UsageError,
)
from appliance.format import fields
from appliance.serve import protocol
from appliance.serve.auth import authorized, load_api_keys
from appliance.serve.metrics import Metrics
from appliance.serve.model import ServableModel, check_file
from appliance.serve.queue import RequestQueue
from appliance.serve.supervisor import describe_exit
from appliance.serve.worker import FaultHook

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_request_maps_to_llama_arguments() -> None:
    req = protocol.parse_chat({
        **CHAT, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
        "max_completion_tokens": 7, "stop": "\n", "seed": 3, "logit_bias": {"2": -100},
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]},
                     {"role": "user", "content": "hi"}],
    })
    assert req.model == "m" and req.stream and req.include_usage
    assert req.params == {
        "temperature": 0.0, "seed": 3, "stop": ["\n"], "logit_bias": {2: -100.0},
        "messages": [{"role": "system", "content": "ab"}, {"role": "user", "content": "hi"}],
        "max_tokens": 7, "stream": True,
    }


def test_completion_defaults_to_sixteen_tokens_like_openai() -> None:
    req = protocol.parse_completion({"model": "m", "prompt": ["once"]})
    assert req.params == {"prompt": "once", "max_tokens": 16, "stream": False}
    assert not req.stream and not req.include_usage


@pytest.mark.parametrize(
    "body",
    [
        {**CHAT, "messages": []},
        {**CHAT, "messages": "hi"},
        {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]},
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        {**CHAT, "messages": ["hi"]},
        {**CHAT, "temperature": 3},
        {**CHAT, "temperature": "hot"},
        {**CHAT, "temperature": True},
        {**CHAT, "top_k": 1.5},
        {**CHAT, "max_tokens": 0},
        {**CHAT, "max_tokens": "10"},
        {**CHAT, "stop": ["a", "b", "c", "d", "e"]},
        {**CHAT, "stop": [""]},
        {**CHAT, "n": 2},
        {**CHAT, "stream": "yes"},
        {**CHAT, "stream_options": {"include_usage": True, "other": 1}},
        {**CHAT, "logit_bias": {"x": 1}},
        {**CHAT, "logit_bias": {"1": 500}},
        {**CHAT, "tools": [{"type": "function"}]},
        {**CHAT, "response_format": {"type": "json_schema"}},
        {**CHAT, "logprobs": True},
        {**CHAT, "frobnicate": 1},
        {**CHAT, "model": ""},
    ],
)
def test_bad_chat_requests_are_400(body: dict[str, object]) -> None:
    with pytest.raises(BadRequestError):
        protocol.parse_chat(body)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "prompt": ["a", "b"]},
        {"model": "m", "prompt": [1, 2, 3]},
        {"model": "m", "prompt": "a", "suffix": "b"},
        {"model": "m", "prompt": "a", "logprobs": 2},
        {"model": "m", "prompt": "a", "echo": "yes"},
        {"model": "m", "prompt": "a", "best_of": 3},
        {"model": "m", "prompt": "a", "messages": []},
    ],
)
def test_bad_completion_requests_are_400(body: dict[str, object]) -> None:
    with pytest.raises(BadRequestError):
        protocol.parse_completion(body)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "input": ""},
        {"model": "m", "input": []},
        {"model": "m", "input": ["ok", 3]},
        {"model": "m", "input": ["x"] * (protocol.MAX_EMBEDDING_INPUTS + 1)},
        {"model": "m", "input": "a", "encoding_format": "hex"},
        {"model": "m", "input": "a", "dimensions": 8},
    ],
)
def test_bad_embedding_requests_are_400(body: dict[str, object]) -> None:
    with pytest.raises(BadRequestError):
        protocol.parse_embedding(body)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_body_must_be_a_json_object(raw: bytes) -> None:
    with pytest.raises(BadRequestError):
        protocol.parse_body(raw)


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "model": "n", "prompt": "x"}',
    b'{"messages": [{"role": "user", "role": "system", "content": "x"}]}',
])
def test_a_key_repeated_in_one_object_is_400(raw: bytes) -> None:
    with pytest.raises(BadRequestError, match="repeats the key"):
        protocol.parse_body(raw)


@pytest.mark.parametrize("depth", [fields.MAX_JSON_DEPTH + 1, 5_000, 1_000_000])
def test_deeply_nested_bodies_are_400_not_a_recursion_error(depth: int) -> None:
    raw = b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    with pytest.raises(BadRequestError, match="nests deeper"):
        protocol.parse_body(raw)


def test_nesting_up_to_the_cap_is_accepted() -> None:
    depth = fields.MAX_JSON_DEPTH
    raw = b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    assert protocol.parse_body(raw)["a"]


def test_api_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# site keys\n\nkey-aaaaaaaaaaaaaaaa\n  key-bbbbbbbbbbbbbbbb  \n")
    keys = load_api_keys(keys_file)
    assert keys == {"key-aaaaaaaaaaaaaaaa", "key-bbbbbbbbbbbbbbbb"}
    assert authorized("Bearer key-bbbbbbbbbbbbbbbb", keys)
    assert authorized("bearer key-aaaaaaaaaaaaaaaa", keys)
    for header in (None, "", "Bearer", "Bearer wrong-key-xxxxxxxxx", "Basic key-aaaaaaaaaaaaaaaa",
                   "key-aaaaaaaaaaaaaaaa"):
        assert not authorized(header, keys)
    assert authorized(None, frozenset())


@pytest.mark.parametrize("content", ["", "# only a comment\n", "short\n", "has space 0123456789\n"])
def test_bad_api_key_files_are_usage_errors(tmp_path: Path, content: str) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(content)
    with pytest.raises(UsageError):
        load_api_keys(keys_file)


def test_missing_api_key_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_api_keys(tmp_path / "absent")


def test_queue_lets_max_waiting_wait_and_refuses_more() -> None:
    async def scenario() -> list[str]:
        queue = RequestQueue(max_waiting=2)
        lock = asyncio.Lock()
        order: list[str] = []
        await queue.acquire(lock)  # running
        waiters = [asyncio.create_task(queue.acquire(lock)) for _ in range(2)]
        await asyncio.sleep(0)
        assert queue.waiting == 2
        with pytest.raises(QueueFullError):
            await queue.acquire(lock)
        for i, waiter in enumerate(waiters):
            lock.release()
            await waiter
            order.append(f"waiter {i} ran")
        lock.release()
        assert queue.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["waiter 0 ran", "waiter 1 ran"]


def test_queue_of_zero_refuses_while_busy() -> None:
    async def scenario() -> None:
        queue = RequestQueue(max_waiting=0)
        lock = asyncio.Lock()
        await queue.acquire(lock)
        with pytest.raises(QueueFullError):
            await queue.acquire(lock)
        lock.release()
        await queue.acquire(lock)  # free again: no waiting needed

    asyncio.run(scenario())


def test_metrics_text_is_prometheus_exposition() -> None:
    metrics = Metrics()
    metrics.observe_request("/v1/completions", 200)
    metrics.observe_generation("m\"x", {"prompt_tokens": 5, "completion_tokens": 11,
                                        "generation_seconds": 0.5, "time_to_first_token": 0.1})
    metrics.worker_restarts["m\"x"] += 1
    text = metrics.render()
    assert 'appliance_serve_requests_total{path="/v1/completions",status="200"} 1' in text
    assert 'appliance_serve_tokens_generated_total{model="m\\"x"} 11' in text
    assert 'appliance_serve_tokens_per_second{model="m\\"x"} 20' in text
    assert 'appliance_serve_worker_restarts_total{model="m\\"x"} 1' in text
    assert "# TYPE appliance_serve_queue_depth gauge" in text
    assert text.endswith("\n")


def test_check_file_refuses_missing_resized_and_non_regular(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 10)
    check_file(ServableModel("m", path, 10, "id"))
    with pytest.raises(TruncatedError):
        check_file(ServableModel("m", path, 11, "id"))
    with pytest.raises(IntegrityError):
        check_file(ServableModel("m", path, 9, "id"))
    with pytest.raises(IntegrityError):
        check_file(ServableModel("m", tmp_path / "absent", 10, "id"))
    with pytest.raises(IntegrityError):
        check_file(ServableModel("m", tmp_path, 10, "id"))


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(-signal.SIGSEGV) == "SIGSEGV (signal 11)"
    assert describe_exit(-signal.SIGILL) == "SIGILL (signal 4)"
    assert describe_exit(3) == "exit status 3"
    assert describe_exit(None) == "unknown exit"


def test_fault_hook_rules() -> None:
    hook = FaultHook("SIGSEGV:boom; sleep0.5:slow:2 ;SIGILL:@load")
    assert [(r.action, r.trigger, r.after_chunks) for r in hook.rules] == [
        ("SIGSEGV", "boom", None), ("sleep0.5", "slow", 2), ("SIGILL", "@load", None)]
    assert [r.action for r in hook.for_request({"prompt": "a boom b"})] == ["SIGSEGV"]
    assert hook.for_request({"prompt": "quiet"}) == []
    assert FaultHook(None).rules == []
    with pytest.raises(ValueError):
        FaultHook("SIGSEGV")
