"""Serving overhead: streaming generation through ``appliance serve`` vs in-process llama.cpp.

Same model (gemma-3-270m when installed, else the tiny llama), same threads, same context,
same prompts, same greedy sampling and ``max_tokens``. Ours: the real app under uvicorn on
127.0.0.1 with its worker process, read as SSE by an httpx client. Native: llama-cpp-python's
``create_completion(stream=True)`` in this process. Both are timed the same way, from the
client's side: tokens generated / (request start to last chunk), and time to first token =
request start to first chunk. Both must produce the same text (greedy, same seed), so the
token count, exact from the server's usage, is the same on both sides. Runs alternate so
both sides see the same machine load; the best of each is kept.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import BenchContext, Comparison

THREADS = 2
N_CTX = 512
TINY_N_CTX = 256  # the tiny llama's training context
PROMPT = "The history of the printing press begins"


@dataclass(frozen=True)
class Run:
    text: str
    first_token_s: float
    total_s: float


def _timed(pieces: Iterable[str], start: float) -> Run:
    first = 0.0
    text: list[str] = []
    for piece in pieces:
        if not text:
            first = time.perf_counter()
        text.append(piece)
    return Run("".join(text), first - start, time.perf_counter() - start)


def _sse_texts(response: httpx.Response, usage: list[int]) -> Iterable[str]:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        event = json.loads(line[6:])
        if event.get("usage"):
            usage.append(event["usage"]["completion_tokens"])
        for choice in event["choices"]:
            yield choice["text"]


def _native_texts(chunks: Iterable[Any]) -> Iterable[str]:
    for chunk in chunks:
        yield chunk["choices"][0]["text"]


def _best(runs: list[Run]) -> Run:
    return Run(runs[0].text, min(r.first_token_s for r in runs), min(r.total_s for r in runs))


def run(ctx: BenchContext) -> list[Comparison]:
    import llama_cpp

    from appliance.serve.app import create_app
    from appliance.serve.model import ServableModel, ServeSettings
    from appliance.serve.server import ServerThread

    logging.getLogger("appliance.serve").setLevel(logging.WARNING)
    model_path: Path = ctx.model_path or ctx.tiny_model_path
    label = "gemma3-270m Q4_K_M" if ctx.model_path else "tiny llama"
    max_tokens = 32 if ctx.quick else 128
    repeats = 2 if ctx.quick else 3
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0}

    n_ctx = N_CTX if ctx.model_path else TINY_N_CTX
    native = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=THREADS,
                             n_threads_batch=THREADS, verbose=False)

    def resolve(name: str) -> ServableModel:
        return ServableModel(name, model_path, os.path.getsize(model_path), "bench")

    settings = ServeSettings(models=("bench",), n_threads=THREADS, n_ctx=n_ctx)
    ours: list[Run] = []
    theirs: list[Run] = []
    usage: list[int] = []
    with ServerThread(create_app(settings, resolve)) as server, httpx.Client(timeout=600) as http:
        deadline = time.monotonic() + 300
        while http.get(f"{server.url}/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the bench server never became ready")
            time.sleep(0.05)
        # One warm-up round (page cache, first-call allocations), then alternate.
        for i in range(repeats + 1):
            prompt = f"{PROMPT} ({i})"
            body = {"model": "bench", "prompt": prompt, "stream": True,
                    "stream_options": {"include_usage": True}, **params}
            start = time.perf_counter()
            with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                response.raise_for_status()
                mine = _timed(_sse_texts(response, usage), start)
            start = time.perf_counter()
            native_run = _timed(
                _native_texts(native.create_completion(prompt, stream=True, **params)), start)
            if mine.text != native_run.text:
                raise RuntimeError(f"the two sides generated different text: {mine.text!r} vs "
                                   f"{native_run.text!r}")
            if i:
                ours.append(mine)
                theirs.append(native_run)
    native.close()
    tokens = usage[-1]
    a, b = _best(ours), _best(theirs)
    overhead_ms = (a.first_token_s - b.first_token_s) * 1000
    return [Comparison(
        name=f"serve: streaming generation ({label}, {THREADS} threads, {tokens} tokens)",
        unit="tok/s",
        ours=tokens / a.total_s,
        native=tokens / b.total_s,
        native_tool=f"llama-cpp-python {llama_cpp.__version__} create_completion(stream=True) "
                    "in-process",
        note=(f"time to first token: ours {a.first_token_s * 1000:.0f} ms, native "
              f"{b.first_token_s * 1000:.0f} ms ({overhead_ms:+.0f} ms through HTTP, queue "
              f"and worker pipe); best of {repeats}"),
    )]
