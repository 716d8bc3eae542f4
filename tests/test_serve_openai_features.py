"""The OpenAI features llama-server brings, through our front, with real clients.

The ``openai`` package and ``langchain-openai`` talk to a real ``appliance`` server whose engine
is llama.cpp's own llama-server, on the tiny llama. Its weights are random, so every valid tool
call and every schema-valid JSON answer below is valid only because llama.cpp constrained the
sampling with a grammar: exactly what is tested. Skipped when llama-server is not built
(``scripts/build_llama_server.sh``, which ``scripts/setup.sh`` runs).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from llama_server_helpers import grammar_ready_tiny
from serve_helpers import metric, running_server

from appliance.serve.engine import NOT_BUILT, find_binary
from appliance.serve.server import ServerThread
from appliance.tiny_model import EOS_ID

pytestmark = pytest.mark.skipif(find_binary() is None, reason=NOT_BUILT)

KEY = "test-key-0123456789abcdef"
WEATHER_SCHEMA = {
    "type": "object",
    # Enums and bounded integers: a random model's free strings run to max_tokens (and need
    # not be valid UTF-8), so the answer would be cut short rather than shown valid.
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "The time",
                                      "parameters": {"type": "object",
                                                     "properties": {"zone": {"enum": ["UTC",
                                                                                  "CET"]}},
                                                     "required": ["zone"],
                                                     "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "hello"}]
# The random model must not stop early where length matters: no </s>, no <|im_end|> (id 4,
# after the tiny model's <unk> <s> </s> <|im_start|>).
NO_EOS = {str(EOS_ID): -100, str(EOS_ID + 2): -100}


@pytest.fixture(scope="module")
def server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tiny = grammar_ready_tiny(tiny_gguf, tmp_path_factory.mktemp("grammar") / "tiny.gguf")
    with running_server({"tiny": tiny}, engine="llama-server", parallel=3,
                        api_keys=frozenset({KEY})) as served:
        yield served


@pytest.fixture()
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _arguments(call: Any, schema: dict[str, Any]) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    return dict(arguments)


def test_tool_choice_required_gives_a_schema_valid_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=96, seed=1)
    calls = reply.choices[0].message.tool_calls
    assert calls, reply
    assert reply.choices[0].finish_reason == "tool_calls"
    for call in calls:
        schema = next(t["function"]["parameters"] for t in TOOLS
                      if t["function"]["name"] == call.function.name)
        _arguments(call, schema)


def test_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, max_tokens=96, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    _arguments(calls[0], WEATHER_SCHEMA)


def test_streamed_tool_call_assembles_to_valid_arguments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, max_tokens=96, seed=3, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, arguments = "", ""
    for chunk in stream:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += delta.function.name or "" if delta.function else ""
            arguments += delta.function.arguments or "" if delta.function else ""
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)


def test_json_schema_response_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=96, seed=4,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}})
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), WEATHER_SCHEMA)


def test_json_object_response_parses(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=64, seed=5,
                                           response_format={"type": "json_object"},
                                           logit_bias=NO_EOS)
    finish = reply.choices[0].finish_reason
    if finish == "stop":  # a complete object; cut at max_tokens it cannot be
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    else:
        assert (reply.choices[0].message.content or "").startswith("{")


def test_logprobs_on_chat_and_completions(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4,
                                           logprobs=True, top_logprobs=3, logit_bias=NO_EOS)
    content = reply.choices[0].logprobs and reply.choices[0].logprobs.content
    # One entry per token that became text (a byte of a longer character may not).
    assert content and len(content) <= reply.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(item.top_logprobs) == 3 and item.logprob <= 0 for item in content)
    # Seeded: an unseeded answer can stay inside a multi-byte character at every token, and
    # llama-server then gives logprobs null (the next test forces that case).
    text = client.completions.create(model="tiny", prompt="once", max_tokens=4, logprobs=2,
                                     logit_bias=NO_EOS, seed=0)
    assert text.choices[0].logprobs is not None


BYTE_F0 = 5 + 0xF0  # the tiny vocabulary's <0xF0>: after 5 specials, one token per byte
LETTER_A = 5 + 256 + ord("a") - 0x21  # then printable ASCII from "!"


def test_llama_server_gives_no_logprobs_for_tokens_that_end_in_a_partial_character(
        client: openai.OpenAI) -> None:
    """llama-server records a token's probabilities only when the text so far does not end
    in an incomplete UTF-8 character (``process_token`` in tools/server/server-context.cpp),
    so an answer cut off inside characters at every step comes back with ``logprobs: null``.
    0xF0 opens a four-byte character: three of them never complete one. This is the flaky
    null seen once in four full-suite runs on an unseeded answer (docs/DESIGN.md); the test
    pins llama-server's behaviour so that a release changing it is noticed."""
    cut = client.completions.create(model="tiny", prompt="once", max_tokens=3, logprobs=2,
                                    logit_bias={**NO_EOS, str(BYTE_F0): 100})
    assert cut.usage is not None and cut.usage.completion_tokens == 3
    assert cut.choices[0].logprobs is None
    whole = client.completions.create(model="tiny", prompt="once", max_tokens=3, logprobs=2,
                                      logit_bias={**NO_EOS, str(LETTER_A): 100})
    assert whole.choices[0].text == "aaa"
    # llama-server answers a text completion's logprobs in the chat form ("content").
    content = whole.model_dump()["choices"][0]["logprobs"]["content"]
    assert [item["token"] for item in content] == ["a", "a", "a"]


def test_unknown_extra_fields_are_ignored_known_ones_still_checked(
        server: ServerThread) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": ASK, "max_tokens": 2, "cache_prompt": True,
            "reasoning_effort": "low", "parallel_tool_calls": False}
    ok = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60,
                     json={**body, "temperature": "hot"})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    unknown_tool = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60,
                              json={**body, "tools": TOOLS, "tool_choice": {
                                  "type": "function", "function": {"name": "nope"}}})
    assert unknown_tool.status_code == 400


def _parallel_streams(url: str, model: str, max_tokens: int, bias: dict[str, int],
                      freeze: int | None = None) -> tuple[list[float], list[float]]:
    """First- and last-token times of 3 streamed completions started together; with
    ``freeze`` (the llama-server pid) it is stopped until all three reached it."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
    firsts: dict[int, float] = {}
    lasts: dict[int, float] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(3)

    def one(i: int) -> None:
        try:
            go.wait()
            stream = client.completions.create(model=model, prompt=f"story {i}",
                                               max_tokens=max_tokens, stream=True,
                                               logit_bias=bias, temperature=0)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    firsts.setdefault(i, time.monotonic())
            lasts[i] = time.monotonic()
        except BaseException as e:  # reported below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    if freeze is not None:
        os.kill(freeze, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        if freeze is not None:
            headers = {"Authorization": f"Bearer {KEY}"}
            deadline = time.monotonic() + 30
            while metric(url, "appliance_serve_requests_in_flight", headers) < 3:
                assert time.monotonic() < deadline, "the three requests never arrived"
                time.sleep(0.02)
            time.sleep(0.3)  # and on to the frozen child's sockets
    finally:
        if freeze is not None:
            os.kill(freeze, signal.SIGCONT)
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(firsts) == len(lasts) == 3
    return sorted(firsts.values()), sorted(lasts.values())


def test_three_parallel_streams_overlap(server: ServerThread) -> None:
    pid = httpx.get(f"{server.url}/health", timeout=10).json()["models"]["tiny"]["pid"]
    # The tiny model streams thousands of tokens/s, faster than this one Python process
    # (client threads and the server's front) starts three requests on two busy cores: the
    # child is frozen until all three reached it, so they start in one batch.
    firsts, lasts = _parallel_streams(server.url, "tiny", 230, NO_EOS, freeze=pid)
    # Every stream had its first token before any of them finished: they ran at once.
    assert firsts[-1] < lasts[0]
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=10).text
    busy = next(line for line in metrics.splitlines()
                if line.startswith("llamacpp:n_busy_slots_per_decode{"))
    assert float(busy.rsplit(" ", 1)[1]) > 1.0  # llama.cpp decoded slots together


def test_langchain_structured_output_and_bind_tools(server: ServerThread) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: Literal["Paris", "Oslo", "Lima"]
        days: int = Field(ge=1, le=7)

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model="tiny",  # type: ignore[arg-type]
                     max_tokens=96, max_retries=0, seed=6)
    structured = llm.with_structured_output(Weather, method="json_schema")
    answer = structured.invoke("weather?")
    assert isinstance(answer, Weather)
    bound = llm.bind_tools([Weather], tool_choice="Weather")
    message = bound.invoke("weather?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"  # type: ignore[attr-defined]
    Weather.model_validate(message.tool_calls[0]["args"])  # type: ignore[attr-defined]


@pytest.mark.slow
def test_gemma_tool_call_json_schema_and_three_parallel_streams(gemma_gguf: Path) -> None:
    with running_server({"gemma3-270m": gemma_gguf}, engine="llama-server", parallel=3,
                        n_threads=2, n_ctx=1024, api_keys=frozenset({KEY})) as served:
        firsts, lasts = _parallel_streams(served.url, "gemma3-270m", 48, {})
        # Every stream had its first token before any of them finished: they ran at once.
        assert firsts[-1] < lasts[0]
        gemma = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0,
                              timeout=300)
        ask = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
        reply = gemma.chat.completions.create(
            model="gemma3-270m", messages=ask, tools=TOOLS, max_tokens=256, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        calls = reply.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "get_weather"
        _arguments(calls[0], WEATHER_SCHEMA)
        answer = gemma.chat.completions.create(
            model="gemma3-270m", messages=ask, max_tokens=256, temperature=0,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}})
        assert answer.choices[0].finish_reason == "stop", answer
        jsonschema.validate(json.loads(answer.choices[0].message.content or ""), WEATHER_SCHEMA)
