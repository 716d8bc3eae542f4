"""Serving throughput: ``appliance serve`` (llama-server engine) vs llama-server alone.

Same model (gemma-3-270m when installed, else the tiny llama), same llama-server binary and
command line (``llama_server.server_argv``: threads, slots, context), same prompts, greedy
sampling and ``max_tokens``, in the same run. Ours: the real app under uvicorn on 127.0.0.1
(auth layer, queue, access log, metrics, its llama-server child), read as SSE by httpx.
Ours runs in its own process (``python -m bench.bench_serve MODEL PORT``), as
``appliance serve`` would, so that the bench's client threads do not share its interpreter.
Native: the same llama-server started directly. For 1, 4 and 8 concurrent streams: aggregate
generated tokens/s (the sum of every stream's tokens, exact from the usage chunk, over the
wall time from the first request to the last token); and time to first token, the median of
alternating one-token requests with nothing else running.
The two sides alternate per round so both see the same machine load; the best round is kept.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import BenchContext, Comparison

THREADS = 2
SLOTS = 8
N_CTX = 512  # per slot
TINY_N_CTX = 256
STREAMS = (1, 4, 8)
PROMPT = "The history of the printing press begins"


@dataclass(frozen=True)
class Round:
    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def _stream(http: httpx.Client, url: str, body: dict[str, Any], out: list[int]) -> None:
    tokens = 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    out.append(tokens)


def _round(http: httpx.Client, url: str, streams: int, params: dict[str, Any], i: int) -> Round:
    out: list[int] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=_stream, args=(http, url, {
        "model": "bench", "prompt": f"{PROMPT} ({i}.{n})", "stream": True,
        "stream_options": {"include_usage": True}, **params}, out))
        for n in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if len(out) != streams:
        raise RuntimeError(f"{streams - len(out)} of {streams} streams failed")
    return Round(sum(out), seconds)


def _wait(http: httpx.Client, url: str, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            if http.get(f"{url}/health", headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never became ready")
        time.sleep(0.05)


def _settings(n_ctx: int) -> Any:
    from appliance.serve.model import ServeSettings

    return ServeSettings(models=("bench",), n_threads=THREADS, n_ctx=n_ctx,
                         engine="llama-server", parallel=SLOTS, max_queue=64)


def serve_child(model_path: Path, port: int, n_ctx: int) -> None:
    """Ours: the real app (auth layer, queue, access log, metrics, its llama-server child)
    under uvicorn on 127.0.0.1:PORT, in the foreground of this process."""
    from appliance.serve.app import create_app
    from appliance.serve.model import ServableModel
    from appliance.serve.server import bind
    from appliance.serve.server import run as serve

    def resolve(name: str) -> ServableModel:
        return ServableModel(name, model_path, os.path.getsize(model_path), "bench")

    logging.getLogger("appliance.serve").setLevel(logging.WARNING)
    serve(create_app(_settings(n_ctx), resolve), bind(f"127.0.0.1:{port}"))


def _first_token(http: httpx.Client, url: str, i: int) -> float:
    body = {"model": "bench", "prompt": f"{PROMPT} ({i})", "max_tokens": 1, "stream": True,
            "temperature": 0.0}
    start = time.perf_counter()
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError(f"{url}: no token in the stream")


def run(ctx: BenchContext) -> list[Comparison]:
    import statistics
    import sys

    from appliance.serve.engine import (
        NOT_BUILT,
        find_binary,
        free_port,
        gguf_facts,
        server_argv,
    )

    binary = find_binary()
    if binary is None:
        raise RuntimeError(NOT_BUILT)
    logging.getLogger("appliance.serve").setLevel(logging.WARNING)
    model_path: Path = ctx.model_path or ctx.tiny_model_path
    label = "gemma3-270m Q4_K_M" if ctx.model_path else "tiny llama"
    max_tokens = 32 if ctx.quick else 96
    repeats = 1 if ctx.quick else 3
    n_ctx = N_CTX if ctx.model_path else TINY_N_CTX
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
    settings = _settings(n_ctx)
    port, our_port = free_port(), free_port()
    argv = server_argv(binary, str(model_path), port, settings, gguf_facts(model_path),
                       alias="bench")
    native = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    native_url = f"http://127.0.0.1:{port}"
    ours_proc = subprocess.Popen([sys.executable, "-m", "bench.bench_serve", str(model_path),
                                  str(our_port), str(n_ctx)], stdout=subprocess.DEVNULL)
    our_url = f"http://127.0.0.1:{our_port}"
    best: dict[tuple[str, int], Round] = {}
    first_token: dict[str, list[float]] = {"ours": [], "native": []}
    try:
        with httpx.Client(timeout=600, trust_env=False) as http:
            _wait(http, our_url)
            _wait(http, native_url)
            sides = {"ours": our_url, "native": native_url}
            # Warm-up with every slot busy: a slot's first use allocates and builds graphs,
            # which would land in whichever round first used it.
            for url in sides.values():
                _round(http, url, SLOTS, params, 0)
            for i in range(1, repeats + 1):
                for streams in STREAMS:
                    for side, url in sides.items():
                        r = _round(http, url, streams, params, i)
                        key = (side, streams)
                        if key not in best or r.rate > best[key].rate:
                            best[key] = r
            for i in range(5 if ctx.quick else 15):
                for side, url in sides.items():
                    first_token[side].append(_first_token(http, url, i))
    finally:
        for proc in (native, ours_proc):
            proc.terminate()
            proc.wait(30)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             check=False).stderr.strip().splitlines()
    tool = f"llama-server alone ({version[0] if version else 'same binary'}, same argv)"
    rows = []
    for streams in STREAMS:
        ours, theirs = best[("ours", streams)], best[("native", streams)]
        note = f"{ours.tokens} tokens in {ours.seconds:.2f} s vs {theirs.tokens} in " \
               f"{theirs.seconds:.2f} s; best of {repeats}"
        if streams == 1:
            mine, native_s = (statistics.median(first_token[side]) * 1000
                              for side in ("ours", "native"))
            note += (f"; time to first token (median of {len(first_token['ours'])} alternating "
                     f"one-token requests): ours {mine:.1f} ms, native {native_s:.1f} ms "
                     f"({mine - native_s:+.1f} ms)")
        rows.append(Comparison(
            name=f"serve: {streams} concurrent streams ({label}, {THREADS} threads, "
                 f"{SLOTS} slots, {max_tokens} tokens each)",
            unit="tok/s", ours=ours.rate, native=theirs.rate, native_tool=tool, note=note))
    return rows


if __name__ == "__main__":
    import sys

    serve_child(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
