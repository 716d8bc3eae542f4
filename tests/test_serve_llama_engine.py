"""What our front keeps over the llama-server engine: crash isolation, verify-before-load and
its audit, API keys, the bounded queue (429), the lifecycle, the access log and /metrics.

Real ``appliance`` servers on loopback with llama.cpp's own llama-server as each model's
worker, on the tiny llama; skipped when llama-server is not built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_helpers import metric, running_server, wait_health

from appliance.errors import IntegrityError
from appliance.serve.engine import NOT_BUILT, find_binary
from appliance.serve.model import ServableModel
from appliance.tiny_model import EOS_ID

pytestmark = pytest.mark.skipif(find_binary() is None, reason=NOT_BUILT)

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_EOS = {str(EOS_ID): -100, str(EOS_ID + 2): -100}  # </s> and <|im_end|> (id 4)
LONG = {"model": "tiny", "prompt": "go", "max_tokens": 200, "logit_bias": NO_EOS}


def _health(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/health", timeout=10).json())


def _wait_state(url: str, model: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = _health(url)
        if health["models"][model]["state"] == state:
            return health
        assert time.monotonic() < deadline, f"{model} never became {state}: {health}"
        time.sleep(0.05)


def test_a_killed_worker_fails_its_request_by_signal_and_the_next_request_loads_it(
        tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, engine="llama-server", preload=False) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                               timeout=60)
        assert _health(server.url)["models"]["tiny"]["state"] == "unloaded"
        client.completions.create(model="tiny", prompt="a", max_tokens=2)  # loads it
        pid = _health(server.url)["models"]["tiny"]["pid"]
        assert pid
        answers: list[httpx.Response] = []
        # The tiny model answers in milliseconds: frozen, the child holds the request for sure.
        os.kill(pid, signal.SIGSTOP)
        asking = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{server.url}/v1/completions", json=LONG, timeout=60)))
        asking.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGSEGV)  # delivered when it runs again
        os.kill(pid, signal.SIGCONT)
        asking.join(60)
        assert answers[0].status_code == 500
        assert answers[0].json()["error"]["code"] == "worker_crashed"
        assert "crashed with SIGSEGV (signal 11)" in answers[0].json()["error"]["message"]
        assert answers[0].headers["x-should-retry"] == "false"
        health = _wait_state(server.url, "tiny", "unloaded")
        assert "SIGSEGV" in health["models"]["tiny"]["detail"]
        again = client.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert again.choices[0].finish_reason in ("length", "stop")
        assert _health(server.url)["models"]["tiny"]["pid"] not in (None, pid)
        assert metric(server.url, 'appliance_serve_worker_crashes_total{model="tiny",'
                                  'signal="SIGSEGV"}') == 1
        assert metric(server.url, 'appliance_serve_worker_restarts_total{model="tiny"}') == 1


def test_a_model_failing_verification_is_refused_at_its_first_request_and_audited(
        tiny_gguf: Path) -> None:
    records: list[tuple[str, dict[str, Any]]] = []
    loads: list[str] = []

    def resolve(name: str) -> ServableModel:
        loads.append(name)
        raise IntegrityError("the GGUF header differs from the signed manifest",
                             file=f"{name}/tiny.gguf")

    with running_server({"tiny": tiny_gguf}, engine="llama-server", preload=False,
                        resolver=resolve, audit=lambda k, d: records.append((k, d))) as server:
        answer = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny",
                                                                  "prompt": "x"}, timeout=30)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "model_refused"
        assert "IntegrityError" in answer.json()["error"]["message"]
        assert _health(server.url)["models"]["tiny"]["state"] == "refused"
    assert loads == ["tiny"]
    refusals = [d for k, d in records if k == "refusal"]
    assert len(refusals) == 1 and refusals[0]["error"] == "IntegrityError"
    assert [d["engine"] for k, d in records if k == "serve-start"] == ["llama-server"]


def test_api_keys_are_required_on_every_api(tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, engine="llama-server",
                        api_keys=frozenset({KEY})) as server:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/api/tags"), ("POST", "/api/chat"), ("GET", "/metrics")):
            assert httpx.request(method, f"{server.url}{path}", timeout=10).status_code == 401
        ok = httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                        json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200


def test_the_queue_beyond_the_slots_answers_429(tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, engine="llama-server", parallel=1,
                        max_queue=0) as server:
        pid = _health(server.url)["models"]["tiny"]["pid"]
        done: list[int] = []
        os.kill(pid, signal.SIGSTOP)  # the one slot stays busy with the first request
        try:
            first = threading.Thread(target=lambda: done.append(httpx.post(
                f"{server.url}/v1/completions", json=LONG, timeout=60).status_code))
            first.start()
            deadline = time.monotonic() + 10
            while metric(server.url, "appliance_serve_requests_in_flight") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = httpx.post(f"{server.url}/v1/completions", timeout=30,
                                 json={"model": "tiny", "prompt": "b", "max_tokens": 2})
        finally:
            os.kill(pid, signal.SIGCONT)
        first.join(60)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
        assert done == [200]


def test_idle_models_unload_and_max_loaded_makes_room(tiny_gguf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_gguf.read_bytes())
    with running_server({"a": tiny_gguf, "b": other}, engine="llama-server", preload=False,
                        max_loaded=1, keep_alive=1.0) as server:
        def ask(model: str) -> None:
            answer = httpx.post(f"{server.url}/v1/completions", timeout=60,
                                json={"model": model, "prompt": "a", "max_tokens": 2})
            assert answer.status_code == 200, answer.text

        ask("a")
        assert _health(server.url)["models"]["a"]["state"] == "ready"
        ask("b")  # at most one loaded: a makes room
        health = _health(server.url)
        assert health["models"]["b"]["state"] == "ready"
        assert health["models"]["a"]["state"] == "unloaded"
        loaded = httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]
        assert [m["name"] for m in loaded] == ["b"]
        health = _wait_state(server.url, "b", "unloaded", timeout=30)  # keep_alive 1 s
        assert health["models"]["b"]["pid"] is None


def test_access_log_and_metrics(tiny_gguf: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.serve.access")
    with running_server({"tiny": tiny_gguf}, engine="llama-server") as server:
        answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                            json={"model": "tiny", "max_tokens": 3,
                                  "messages": [{"role": "user", "content": "hi"}],
                                  "logit_bias": NO_EOS})
        assert answer.status_code == 200
        usage = answer.json()["usage"]
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.serve.access"]
    line = next(m for m in lines if m.startswith("POST /v1/chat/completions"))
    assert "model=tiny status=200" in line
    assert f"tokens={usage['prompt_tokens']}+{usage['completion_tokens']}" in line
    assert " ms=" in line and "client=127.0.0.1:" in line
    assert 'llamacpp:tokens_predicted_total{model="tiny"}' in text
    assert 'appliance_serve_time_to_first_token_seconds_hist_count{model="tiny"} 1' in text
    assert 'appliance_serve_time_per_output_token_seconds_count{model="tiny"} 1' in text


def test_health_waits_for_a_preloaded_model(tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, engine="llama-server", wait=False) as server:
        health = wait_health(server.url)
        assert health["models"]["tiny"]["state"] == "ready" and health["models"]["tiny"]["pid"]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_an_abandoned_request_stops_generating_within_a_second(gemma_gguf: Path,
                                                               stream: bool) -> None:
    # gemma: a generation of 900 tokens takes far longer than a second on these machines.
    with running_server({"gemma3-270m": gemma_gguf}, engine="llama-server",
                        n_ctx=1024) as server:
        busy = 'llamacpp:requests_processing{model="gemma3-270m"}'
        body = {"model": "gemma3-270m", "prompt": "Once", "max_tokens": 900, "stream": stream,
                "logit_bias": {"1": -100, "106": -100}}  # gemma's <eos>, <end_of_turn>

        def leave() -> None:
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(f"{server.url}/v1/completions", timeout=2, json=body)

        client = threading.Thread(target=leave)
        client.start()
        deadline = time.monotonic() + 30
        while metric(server.url, busy) == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        client.join()  # the client gave up after 2 s
        left = time.monotonic()
        # Streamed or not, llama-server streams it to us (assemble.py), so the slot stops at
        # its next token once the front sees the client gone.
        limit = 1.0
        while metric(server.url, busy) != 0:
            assert time.monotonic() - left < limit, "generation went on after the client left"
            time.sleep(0.05)
