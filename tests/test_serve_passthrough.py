"""The llama-server engine's request checks (pure), engine choice and the CLI's durations."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import BadRequestError, ServeError
from appliance.serve import passthrough
from appliance.serve.engine import find_binary, parse_keep_alive, resolve_engine

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_llama_server_fields_are_checked_and_passed_on() -> None:
    body = {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function",
                                                     "function": {"name": "f"}},
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "logprobs": True, "top_logprobs": 2, "parallel_tool_calls": False,
            "temperature": 0.5}
    params = passthrough.parse_chat(body).params
    for key in ("tools", "tool_choice", "response_format", "logprobs", "top_logprobs",
                "parallel_tool_calls"):
        assert params[key] == body[key]
    assert params["temperature"] == 0.5


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function"}]},
    {"tools": [TOOL], "tool_choice": "sometimes"},
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
    {"tool_choice": "required"},
    {"response_format": {"type": "xml"}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
    {"logprobs": "yes"},
    {"logprobs": True, "top_logprobs": 21},
    {"top_logprobs": 2},
    {"temperature": "hot"},
    {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
    {"messages": [{"role": "user", "content": "x", "color": "red"}]},
])
def test_a_bad_known_field_is_a_bad_request(extra: dict[str, Any]) -> None:
    with pytest.raises(BadRequestError):
        passthrough.parse_chat({**CHAT, **extra})


def test_unknown_fields_are_dropped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.serve")
    body = {**CHAT, "cache_prompt": True, "reasoning_effort": "low"}
    for _ in range(2):
        params = passthrough.parse_chat(body).params
        assert "cache_prompt" not in params and "reasoning_effort" not in params
    said = [r.getMessage() for r in caplog.records if "cache_prompt" in r.getMessage()]
    assert len(said) <= 1  # once per process (an earlier test may have said it already)


def test_tool_call_history_keeps_its_fields() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    params = passthrough.parse_chat({**CHAT, "messages": messages, "tools": [TOOL]}).params
    assert params["messages"][1]["tool_calls"] == [call]
    assert params["messages"][2]["tool_call_id"] == "c1"


def test_completion_logprobs_is_an_int() -> None:
    assert passthrough.parse_completion({"model": "m", "prompt": "a",
                                         "logprobs": 3}).params["logprobs"] == 3
    with pytest.raises(BadRequestError):
        passthrough.parse_completion({"model": "m", "prompt": "a", "logprobs": True})


def test_keep_alive_durations() -> None:
    assert parse_keep_alive("30") == 30
    assert parse_keep_alive("30s") == 30
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h") == 3600
    assert parse_keep_alive("-1") is None
    with pytest.raises(ValueError):
        parse_keep_alive("soon")


def test_engine_choice_without_llama_server(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("APPLIANCE_LLAMA_SERVER", str(tmp_path / "missing"))
    assert find_binary() is None
    assert resolve_engine("auto") == "llama-cpp-python"
    with pytest.raises(ServeError, match=r"build_llama_server\.sh"):
        resolve_engine("llama-server")
    with pytest.raises(ServeError):
        resolve_engine("vllm")


def test_cors_only_for_the_given_origins(tiny_gguf: Path) -> None:
    import httpx
    from serve_helpers import running_server

    keys = frozenset({"test-key-0123456789abcdef"})
    with running_server({"tiny": tiny_gguf}, cors_origins=("http://app.example",),
                        api_keys=keys) as server:
        preflight = httpx.options(f"{server.url}/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        answer = httpx.get(f"{server.url}/v1/models", headers={
            "Origin": "http://app.example", "Authorization": f"Bearer {next(iter(keys))}"})
        assert answer.headers["access-control-allow-origin"] == "http://app.example"
        # A page may read a receipt (serve --receipts) from the answer's headers.
        assert "x-appliance-receipt" in answer.headers["access-control-expose-headers"]
        other = httpx.get(f"{server.url}/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
