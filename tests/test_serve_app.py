"""The OpenAI-compatible API end to end: real uvicorn on 127.0.0.1, real workers, tiny GGUFs.

Clients are the real ``openai`` package, ``curl`` and ``httpx``. One server is shared by the
module; it requires an API key and serves the tiny llama with its ChatML-like template
("tiny"), the same weights declaring a pooling type, i.e. an embedding model ("tiny-embed"),
and a tiny llama whose template starts with the BOS token ("tiny-bos").
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jinja2
import openai
import pytest
from serve_helpers import copy_gguf_with, metric, running_server

from appliance.serve.server import ServerThread
from appliance.tiny_model import DEFAULT_TEMPLATE, write_tiny_llama

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_CTX = 256
# llama-cpp-python adds no BOS to a rendered chat template (real templates carry their own),
# but does to a plain text prompt: with it in the template both paths see the same tokens.
BOS_TEMPLATE = "{{ bos_token }}" + DEFAULT_TEMPLATE


@pytest.fixture(scope="module")
def embed_gguf(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "tiny-embed.gguf"
    return copy_gguf_with(tiny_gguf, out, {"llama.pooling_type": 1})  # 1 = mean pooling


@pytest.fixture(scope="module")
def bos_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bos") / "tiny-bos.gguf"
    return write_tiny_llama(out, seed=1, chat_template=BOS_TEMPLATE)


@pytest.fixture(scope="module")
def server(tiny_gguf: Path, embed_gguf: Path, bos_gguf: Path) -> Iterator[ServerThread]:
    models = {"tiny": tiny_gguf, "tiny-embed": embed_gguf, "tiny-bos": bos_gguf}
    with running_server(models, n_ctx=N_CTX, api_keys=frozenset({KEY})) as s:
        yield s


@pytest.fixture()
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client: openai.OpenAI, text: str, max_tokens: int = 12) -> str:
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        temperature=0,
    )
    return response.choices[0].message.content or ""


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("curl"), "curl is required (scripts/setup.sh installs it)"
    return subprocess.run(["curl", "-sS", "-N", "-H", f"Authorization: Bearer {KEY}",
                           "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def test_models_lists_every_served_model(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "tiny-embed", "tiny-bos"}
    tiny = client.models.retrieve("tiny").model_dump()
    assert tiny["status"] == "ready" and tiny["identity"] == "test-tiny"
    assert tiny["meta"]["chat_template"] is True and tiny["meta"]["embeddings"] is False
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("absent")


def test_chat_uses_the_template_inside_the_gguf(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "hello"}]
    reply = client.chat.completions.create(model="tiny-bos", messages=messages, max_tokens=10,
                                           temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny-bos"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    # The same greedy generation from the GGUF's template rendered by hand: equal text and
    # equal prompt tokens prove the server applied that template, not a built-in format.
    prompt = jinja2.Template(DEFAULT_TEMPLATE).render(messages=messages,
                                                      add_generation_prompt=True)
    plain = client.completions.create(model="tiny-bos", prompt=prompt, max_tokens=10,
                                      temperature=0, stop=["<|im_end|>"])
    assert reply.choices[0].message.content == plain.choices[0].text
    assert reply.usage is not None and plain.usage is not None
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens


def test_streaming_chat_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole_reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream me"}], max_tokens=16,
        temperature=0)
    whole = whole_reply.choices[0].message.content
    assert whole_reply.usage is not None
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream me"}], max_tokens=16,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # Exact counts of sampled tokens (llama-cpp-python runs past max_tokens while a UTF-8
    # sequence is incomplete, which random byte-level weights do often).
    assert chunks[-1].usage.completion_tokens == whole_reply.usage.completion_tokens >= 16


def test_text_completions_through_curl(server: ServerThread) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0}
    out = curl(f"{server.url}/v1/completions", "-H", "Content-Type: application/json",
               "-d", json.dumps(body))
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "200"
    whole = json.loads(payload)
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] >= 1
    out = curl(f"{server.url}/v1/completions", "-d", json.dumps({**body, "stream": True}))
    events, status = out.stdout.rsplit("\n", 1)
    assert status == "200"
    lines = [line for line in events.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    pieces = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(p["choices"][0]["text"] for p in pieces) == whole["choices"][0]["text"]


def test_errors_use_the_openai_shape_and_status(server: ServerThread,
                                                client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="absent", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", temperature=7,
                                       messages=[{"role": "user", "content": "x"}])
    long_prompt = "z " * N_CTX
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    assert "context window" in too_long.value.message
    with pytest.raises(openai.BadRequestError):  # streaming: still a plain 400 before any event
        client.chat.completions.create(model="tiny", stream=True,
                                       messages=[{"role": "user", "content": long_prompt}])
    with pytest.raises(openai.BadRequestError) as no_embeddings:
        client.embeddings.create(model="tiny", input="x")
    assert "does not support embeddings" in no_embeddings.value.message
    out = curl(f"{server.url}/v1/chat/completions", "-d", "{not json")
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "400" and set(json.loads(payload)["error"]) == {"message", "type", "param",
                                                                     "code"}
    out = curl(f"{server.url}/v1/nothing-here")
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "404" and json.loads(payload)["error"]["type"] == "invalid_request_error"
    huge = httpx.post(f"{server.url}/v1/completions", headers=AUTH,
                      content=b"{" + b" " * (9 << 20) + b"}", timeout=60)
    assert huge.status_code == 400 and "larger than" in huge.json()["error"]["message"]


def test_api_keys_are_required_except_for_health(server: ServerThread) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-0123456789",
                        max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.models.list()
    assert refused.value.code == "invalid_api_key"
    anonymous = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"})
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=AUTH).status_code == 200
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_embeddings_where_the_model_declares_pooling(server: ServerThread,
                                                     client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="tiny-embed", input=["hello", "world"])
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 2 and all(len(v) == 64 for v in vectors) and vectors[0] != vectors[1]
    floats = httpx.post(f"{server.url}/v1/embeddings", headers=AUTH, timeout=60,
                        json={"model": "tiny-embed", "input": "hello"}).json()
    assert floats["data"][0]["embedding"] == pytest.approx(vectors[0], rel=1e-5)
    raw = httpx.post(f"{server.url}/v1/embeddings", headers=AUTH, timeout=60,
                     json={"model": "tiny-embed", "input": "hello",
                           "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = struct.unpack("<64f", base64.b64decode(raw))
    assert list(decoded) == pytest.approx(vectors[0], rel=1e-5)
    with pytest.raises(openai.BadRequestError):  # longer than the batch: refused, not truncated
        client.embeddings.create(model="tiny-embed", input="y " * N_CTX)


def test_concurrent_streams_queue_and_never_interrupt_each_other(
    client: openai.OpenAI,
) -> None:
    prompts = [f"story number {i}" for i in range(4)]
    expected = {p: chat(client, p, max_tokens=24) for p in prompts}
    results: dict[str, Any] = {}

    def stream(prompt: str) -> None:
        try:
            chunks = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=24,
                temperature=0, stream=True)
            results[prompt] = "".join(c.choices[0].delta.content or "" for c in chunks)
        except Exception as e:  # reported below with the prompt it belongs to
            results[prompt] = e

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == expected


def test_a_client_that_leaves_mid_stream_stops_its_generation(server: ServerThread,
                                                               client: openai.OpenAI) -> None:
    generated = 'appliance_serve_tokens_generated_total{model="tiny"}'
    before = metric(server.url, generated, AUTH)
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 200, "temperature": 0,
            "logit_bias": {"2": -100}, "stream": True}  # token 2 is </s>: no early end
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH,
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    after_leaving = chat(client, "are you still there", max_tokens=8)
    assert after_leaving == chat(client, "are you still there", max_tokens=8)
    spent = metric(server.url, generated, AUTH) - before
    assert spent < 200  # the abandoned request was cut short, not generated to the end


def test_metrics_count_requests_tokens_and_queue(server: ServerThread,
                                                 client: openai.OpenAI) -> None:
    requests = 'appliance_serve_requests_total{path="/v1/completions",status="200"}'
    generated = 'appliance_serve_tokens_generated_total{model="tiny"}'
    before_requests = metric(server.url, requests, AUTH)
    before_tokens = metric(server.url, generated, AUTH)
    done = client.completions.create(model="tiny", prompt="count me", max_tokens=5,
                                     temperature=0, logit_bias={"2": -100})
    assert done.usage is not None and done.usage.completion_tokens >= 5
    assert metric(server.url, requests, AUTH) == before_requests + 1
    assert metric(server.url, generated, AUTH) == before_tokens + done.usage.completion_tokens
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert "appliance_serve_queue_depth 0" in text
    assert 'appliance_serve_model_ready{model="tiny"} 1' in text
    assert metric(server.url, 'appliance_serve_tokens_per_second{model="tiny"}', AUTH) > 0
