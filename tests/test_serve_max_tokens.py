"""The server's cap on generated tokens (issue 21 item 1): a chat request without max_tokens
gets ``ServeSettings.max_tokens_default`` (``serve --max-tokens-default``), not a full context.

Real uvicorn on loopback and a real llama.cpp worker on the tiny GGUF; the end-of-text token is
biased away so the model would otherwise run to the end of its context.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import running_server

from appliance.serve.server import ServerThread
from appliance.tiny_model import EOS_ID

CAP = 5
NO_END = {str(EOS_ID): -100}


@pytest.fixture(scope="module")
def capped_server(tiny_gguf: Path) -> Iterator[ServerThread]:
    with running_server({"tiny": tiny_gguf}, n_ctx=256, max_tokens_default=CAP) as server:
        yield server


def _chat(server: ServerThread, **extra: object) -> dict[str, object]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0, "logit_bias": NO_END, **extra}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _text(answer: dict[str, object]) -> str:
    return str(answer["choices"][0]["message"]["content"])  # type: ignore[index]


def test_chat_without_max_tokens_stops_at_the_server_cap(capped_server: ServerThread) -> None:
    # llama-cpp-python's usage re-tokenizes the text, so compare answers, not token counts:
    # greedy decoding gives the same text for the same cap.
    uncapped = _chat(capped_server)
    assert uncapped["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert _text(uncapped) == _text(_chat(capped_server, max_tokens=CAP))


def test_the_request_max_tokens_wins_over_the_cap(capped_server: ServerThread) -> None:
    default = _text(_chat(capped_server))
    longer = _text(_chat(capped_server, max_tokens=CAP + 20))
    assert len(longer) > len(default)
    assert longer.startswith(default)
