"""Ollama's API on the serving port, driven by the official ``ollama`` Python client.

A real server (llama-server engine) serves the tiny llama ("tiny") and the same weights
declaring a pooling type, an embedding model ("tiny-embed"), behind an API key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest
from llama_server_helpers import grammar_ready_tiny
from serve_helpers import copy_gguf_with, running_server

from appliance.serve.engine import NOT_BUILT, find_binary
from appliance.serve.server import ServerThread

pytestmark = pytest.mark.skipif(find_binary() is None, reason=NOT_BUILT)

KEY = "test-key-0123456789abcdef"
OPTIONS = {"num_predict": 6, "seed": 1}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                 "maximum": 9}},
          "required": ["n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    embed = copy_gguf_with(tiny_gguf, tmp_path_factory.mktemp("ollama") / "embed.gguf",
                           {"llama.pooling_type": 1})
    tiny = grammar_ready_tiny(tiny_gguf, embed.parent / "tiny.gguf")
    with running_server({"tiny": tiny, "tiny-embed": embed}, engine="llama-server",
                        api_keys=frozenset({KEY})) as served:
        yield served


@pytest.fixture()
def client(server: ServerThread) -> ollama.Client:
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})


def test_version_tags_show_ps(client: ollama.Client, server: ServerThread) -> None:
    version = httpx.get(f"{server.url}/api/version",
                        headers={"Authorization": f"Bearer {KEY}"}).json()["version"]
    assert version.count(".") == 2
    names = sorted(m.model or "" for m in client.list().models)
    assert names == ["tiny", "tiny-embed"]
    shown = client.show("tiny")
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.capabilities == ["completion", "tools"]
    assert client.show("tiny-embed").capabilities == ["embedding"]
    loaded = sorted(m.model or "" for m in client.ps().models)
    assert loaded == ["tiny", "tiny-embed"]  # preloaded


def test_chat_streams_ndjson_and_answers_whole(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "hello"}]
    parts = list(client.chat(model="tiny", messages=messages, stream=True,
                             options=OPTIONS))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert (parts[-1].eval_count or 0) > 0 and (parts[-1].prompt_eval_count or 0) > 0
    whole = client.chat(model="tiny:latest", messages=messages, options=OPTIONS)
    assert whole.done and whole.message.role == "assistant"
    assert whole.message.content == "".join(p.message.content or "" for p in parts)
    assert (whole.prompt_eval_count or 0) > 0


def test_chat_with_a_format_schema_validates(client: ollama.Client) -> None:
    answer = client.chat(model="tiny", messages=[{"role": "user", "content": "n?"}],
                         format=SCHEMA, options={"num_predict": 32, "seed": 2})
    jsonschema.validate(json.loads(answer.message.content or ""), SCHEMA)


def test_chat_tool_calls_come_back_with_parsed_arguments(client: ollama.Client) -> None:
    tool = {"type": "function", "function": {"name": "pick", "description": "Pick a number",
                                             "parameters": SCHEMA}}
    # Ollama has no tool_choice; the tiny model's generic template lets it answer either way.
    answer = client.chat(model="tiny", messages=[{"role": "user", "content": "pick"}],
                         tools=[tool], options={"num_predict": 48, "seed": 3})
    for call in answer.message.tool_calls or []:
        assert call.function.name == "pick"
        jsonschema.validate(dict(call.function.arguments), SCHEMA)


def test_generate_streams_and_raw(client: ollama.Client) -> None:
    parts = list(client.generate(model="tiny", prompt="once", stream=True,
                                 options=OPTIONS))
    assert parts[-1].done
    raw = client.generate(model="tiny", prompt="once", raw=True,
                          options={**OPTIONS, "stop": ["\n"]})
    assert raw.done and isinstance(raw.response, str)
    assert client.generate(model="tiny", prompt="").done_reason == "load"


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model="tiny-embed", input=["hello", "world"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 64  # n_embd
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="tiny", input="hello")
    assert refused.value.status_code == 400
    assert "does not support embeddings" in refused.value.error


def test_model_management_is_refused_with_the_reason(client: ollama.Client) -> None:
    for call in (lambda: client.pull("tiny"), lambda: client.delete("tiny"),
                 lambda: client.copy("tiny", "x"), lambda: client.push("tiny")):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 403
        assert "signed bundles" in refused.value.error


def test_an_unknown_model_is_404_in_ollama_shape(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404
    assert "not served here" in missing.value.error
