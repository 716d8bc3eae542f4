"""The real model: ``appliance serve`` on a store holding gemma-3-270m (skipped when absent).

Covers the issue's "done" line in one run: the model is written into a real store, served
by the ``appliance serve`` process, answers a chat question through the ``openai`` client
(plain and streaming), and keeps answering after its worker is killed with SIGSEGV.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_helpers import appliance_serve, wait_health
from store_helpers import model_entry, write_model

from appliance.store.store import Store

QUESTION: Any = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.mark.slow
def test_gemma_answers_streams_and_survives_a_killed_worker(gemma_gguf: Path,
                                                            tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = gemma_gguf.read_bytes()
    with Store(store) as s:
        write_model(s, model_entry("gemma3-270m", "1", {"gemma.gguf": data}, 4 << 20),
                    {"gemma.gguf": data})
    del data
    # One thread: on a loaded 2-core machine llama.cpp's threads spin waiting for each other.
    with appliance_serve(store, "--ctx", "1024", "--threads", "1", "--preload") as served:
        health = wait_health(served.url)
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0,
                               timeout=300)
        reply = client.chat.completions.create(model="gemma3-270m", messages=QUESTION,
                                               max_tokens=16, temperature=0)
        answer = reply.choices[0].message.content or ""
        assert answer.strip(), reply
        assert "<start_of_turn>" not in answer  # the GGUF's gemma template was applied

        stream = client.chat.completions.create(model="gemma3-270m", messages=QUESTION,
                                                max_tokens=16, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == answer

        os.kill(health["models"]["gemma3-270m"]["pid"], signal.SIGSEGV)
        deadline = time.monotonic() + 120
        while httpx.get(f"{served.url}/health").json()["models"]["gemma3-270m"]["pid"] in (
                None, health["models"]["gemma3-270m"]["pid"]):
            assert time.monotonic() < deadline, "worker never came back"
            time.sleep(0.1)
        wait_health(served.url)
        again = client.chat.completions.create(model="gemma3-270m", messages=QUESTION,
                                               max_tokens=16, temperature=0)
        assert again.choices[0].message.content == answer
    assert any("died with SIGSEGV" in line for line in served.log)
