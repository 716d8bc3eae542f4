"""Faults: native worker crashes, a full queue, slow loads, refused models.

Crashes are real: the worker's test hook (``APPLIANCE_SERVE_TEST_HOOK``, read only by the
worker process) makes it read address 0 (SIGSEGV) or raise SIGILL; a test also kills an idle
worker from outside. The server must answer with the signal named, log it, restart the
worker and keep serving.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_helpers import metric, running_server, wait_health

from appliance.errors import IntegrityError, ModelNotFoundError
from appliance.serve.model import ServableModel
from appliance.serve.server import ServerThread

HOOK = ";".join([
    "SIGSEGV:segv-now",  # crash before generating
    "SIGILL:sigill-now",
    "SIGSEGV:segv-mid-stream:3",  # crash after three streamed chunks
    "sleep1.5:slow-then-segv",  # hold the worker, then crash, with a request queued behind
    "SIGSEGV:slow-then-segv",
    "slow0.05:linger-please",  # 50 ms a token: 200 tokens take 10 s
])


@pytest.fixture(scope="module")
def server(tiny_gguf: Path) -> Iterator[ServerThread]:
    with running_server({"tiny": tiny_gguf}, hook=HOOK) as s:
        yield s


@pytest.fixture()
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def ask(client: openai.OpenAI, text: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": text}], temperature=0, **kwargs)


def test_a_client_that_leaves_a_non_streamed_completion_stops_its_generation(
    server: ServerThread, client: openai.OpenAI,
) -> None:
    generated = 'appliance_serve_tokens_generated_total{model="tiny"}'
    abandoned = 'appliance_serve_requests_total{path="/v1/completions",status="499"}'
    before, abandoned_before = metric(server.url, generated), metric(server.url, abandoned)
    body = json.dumps({"model": "tiny", "prompt": "linger-please", "max_tokens": 200,
                       "temperature": 0, "logit_bias": {"2": -100}}).encode()  # 2 is </s>
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.5)  # generating by now, seconds from the end
    left = time.monotonic()
    # The worker counts a generation's tokens when it ends: here, when it stops.
    while metric(server.url, generated) == before and time.monotonic() - left < 10:
        time.sleep(0.02)
    # Typically ~0.1 s; the margin is for a loaded CI host (the full answer takes 10 s).
    assert time.monotonic() - left < 2.0
    spent = metric(server.url, generated) - before
    assert 0 < spent < 60  # cut short, not run to 200
    assert metric(server.url, abandoned) == abandoned_before + 1
    after = client.completions.create(model="tiny", prompt="fine", max_tokens=8, temperature=0,
                                      logit_bias={"2": -100})
    assert after.usage is not None and after.usage.completion_tokens == 8


def restarts(server: ServerThread) -> float:
    return metric(server.url, 'appliance_serve_worker_restarts_total{model="tiny"}')


def test_a_segfault_is_reported_and_the_worker_restarts(
    server: ServerThread, client: openai.OpenAI, caplog: pytest.LogCaptureFixture,
) -> None:
    reference = ask(client, "fine").choices[0].message.content
    before = restarts(server)
    retrying = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=2)
    with caplog.at_level(logging.ERROR, logger="appliance.serve"):
        with pytest.raises(openai.InternalServerError) as crashed:
            ask(retrying, "please segv-now")  # told not to retry: one crash, not three
        wait_health(server.url)
    assert crashed.value.status_code == 500
    assert crashed.value.code == "worker_crashed"
    assert "SIGSEGV" in crashed.value.message
    assert any("died with SIGSEGV" in r.getMessage() for r in caplog.records)
    assert restarts(server) == before + 1
    assert 'signal="SIGSEGV"' in httpx.get(f"{server.url}/metrics").text
    assert ask(client, "fine").choices[0].message.content == reference


def test_sigill_in_a_stream_is_a_json_error_naming_the_signal(server: ServerThread) -> None:
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user",
                                                           "content": "sigill-now"}]}
    out = subprocess.run(
        ["curl", "-sS", "-N", "-w", "\n%{http_code}", f"{server.url}/v1/chat/completions",
         "-d", json.dumps(body)], capture_output=True, text=True, timeout=120, check=True)
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "500"
    error = json.loads(payload)["error"]
    assert error["code"] == "worker_crashed" and "SIGILL" in error["message"]
    wait_health(server.url)


def test_a_crash_mid_stream_arrives_as_an_error_event(server: ServerThread,
                                                      client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(openai.APIError) as crashed:
        for chunk in ask(client, "segv-mid-stream", stream=True, max_tokens=50):
            received.append(chunk)
    assert len(received) == 3  # the chunks sent before the crash were delivered
    assert "SIGSEGV" in crashed.value.message
    wait_health(server.url)
    assert ask(client, "fine").choices[0].message.content is not None


def test_a_request_queued_behind_a_crash_is_answered_after_the_restart(
    server: ServerThread, client: openai.OpenAI,
) -> None:
    reference = ask(client, "queued").choices[0].message.content
    outcome: dict[str, Any] = {}

    def doomed() -> None:
        try:
            ask(client, "slow-then-segv")
        except openai.APIError as e:
            outcome["doomed"] = e

    first = threading.Thread(target=doomed)
    first.start()
    _wait_for(lambda: metric(server.url, "appliance_serve_requests_in_flight") >= 1)
    queued = ask(client, "queued")  # waits behind the crashing request and the restart
    first.join(timeout=120)
    assert isinstance(outcome.get("doomed"), openai.InternalServerError)
    assert queued.choices[0].message.content == reference


def test_a_worker_killed_from_outside_while_idle_is_replaced(server: ServerThread,
                                                            client: openai.OpenAI) -> None:
    pid = wait_health(server.url)["models"]["tiny"]["pid"]
    before = restarts(server)
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: restarts(server) == before + 1)
    health = wait_health(server.url)
    assert health["models"]["tiny"]["pid"] != pid
    assert ask(client, "still here").choices[0].message.content is not None


def test_a_full_queue_answers_429_and_queued_requests_still_complete(tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, hook="sleep2:hold-the-worker", max_queue=1) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        answers: dict[str, Any] = {}

        def run(name: str, text: str) -> None:
            answers[name] = ask(client, text).choices[0].finish_reason

        holder = threading.Thread(target=run, args=("holder", "hold-the-worker"))
        holder.start()
        _wait_for(lambda: metric(s.url, "appliance_serve_requests_in_flight") >= 1)
        waiter = threading.Thread(target=run, args=("waiter", "patient"))
        waiter.start()
        _wait_for(lambda: metric(s.url, "appliance_serve_queue_depth") == 1)
        with pytest.raises(openai.RateLimitError) as full:
            ask(client, "one too many")
        assert full.value.status_code == 429 and full.value.code == "queue_full"
        assert full.value.response.headers["retry-after"] == "1"
        holder.join(timeout=120)
        waiter.join(timeout=120)
        assert set(answers) == {"holder", "waiter"}  # neither was cancelled by the other


def test_health_is_503_while_loading_then_200(tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, hook="sleep2:@load", wait=False) as s:
        loading = httpx.get(f"{s.url}/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert loading.json()["models"]["tiny"]["state"] == "loading"
        # A request sent while loading waits for the model instead of failing.
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        assert ask(client, "early bird").choices[0].message.content is not None
        assert httpx.get(f"{s.url}/health").status_code == 200


def test_a_refused_model_is_never_loaded_and_the_refusal_is_audited(tiny_gguf: Path) -> None:
    audits: list[tuple[str, dict[str, Any]]] = []

    def resolve(name: str) -> ServableModel:
        if name == "tampered":
            raise IntegrityError("stored bytes differ from the signed manifest", chunk="ab12")
        if name == "tiny":
            return ServableModel(name, tiny_gguf, tiny_gguf.stat().st_size, "id")
        raise ModelNotFoundError(name)

    def audit(kind: str, details: dict[str, Any]) -> None:
        audits.append((kind, details))

    models = {"tiny": tiny_gguf, "tampered": tiny_gguf}
    with running_server(models, resolver=resolve, audit=audit, wait=False) as s:
        _wait_for(lambda: httpx.get(f"{s.url}/health").json()["models"]["tiny"]["state"]
                  == "ready")
        health = httpx.get(f"{s.url}/health").json()
        assert health["status"] == "unavailable"
        assert health["models"]["tampered"]["state"] == "refused"
        assert health["models"]["tampered"]["pid"] is None  # never spawned
        assert "IntegrityError" in health["models"]["tampered"]["detail"]
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="tampered", prompt="x")
        assert refused.value.status_code == 503 and refused.value.code == "model_refused"
        assert "differ from the signed manifest" in refused.value.message
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
    kinds = [kind for kind, _ in audits]
    assert kinds[0] == "serve-start" and kinds.count("refusal") == 1
    refusal = dict(audits)["refusal"]
    assert refusal["model"] == "tampered" and refusal["error"] == "IntegrityError"


def test_a_file_that_changed_size_is_refused_before_loading(tiny_gguf: Path) -> None:
    def resolve(name: str) -> ServableModel:  # the store recorded one byte more
        return ServableModel(name, tiny_gguf, tiny_gguf.stat().st_size + 1, "id")

    with running_server({"tiny": tiny_gguf}, resolver=resolve, wait=False) as s:
        _wait_for(lambda: httpx.get(f"{s.url}/health").json()["models"]["tiny"]["state"]
                  == "refused")
        health = httpx.get(f"{s.url}/health")
        assert health.status_code == 503
        assert "TruncatedError" in health.json()["models"]["tiny"]["detail"]


def _wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.slow
def test_a_worker_that_crashes_while_loading_is_retried_with_back_off(tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, hook="SIGSEGV:@load", wait=False,
                        ready_timeout=1.0) as s:
        _wait_for(lambda: restarts(s) >= 2)
        health = httpx.get(f"{s.url}/health")
        assert health.status_code == 503
        assert "worker died with SIGSEGV" in health.json()["models"]["tiny"]["detail"]
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as unavailable:  # waited 1 s, then gave up
            ask(client, "anyone")
        assert unavailable.value.status_code == 503
        assert unavailable.value.code == "model_unavailable"
        time.sleep(1.0)
        assert restarts(s) <= 4  # 0.5 s, 1 s, 2 s apart: not a tight loop
