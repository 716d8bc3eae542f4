"""llama.cpp's own ``llama-server`` as the crash-isolated engine of one model.

``LlamaServerWorker`` is a ``supervisor.Worker`` whose child is ``llama-server`` (built from the
llama.cpp vendored in our llama-cpp-python's sdist by ``scripts/build_llama_server.sh``) on a
loopback port, reachable only with a random API key handed over in its environment (never in
``ps``). llama-server does what llama.cpp does well: continuous batching over ``--parallel``
slots, the model's own Jinja chat template with tool-call parsing (``--jinja``), grammars from
JSON schemas, logprobs, GPU offload. This side keeps what it lacks: verify-before-load (every
load asks the resolver, which checks the file against the store), the refusal audit, the
bounded queue (at most ``parallel`` requests in flight, ``max_queue`` waiting, more get 429),
crash detection (a dead child fails the requests it was answering with the signal's name; the
next request loads it again) and the lifecycle: load on first request (or at start with
``preload``), unload after ``keep_alive`` seconds idle, at most ``max_loaded`` loaded at once.

Requests speak the same message protocol as the llama-cpp-python worker (``("chunk"|"result",
rid, body)``, ``("done", rid, stats)``, ``("error", rid, kind, text)``), so the HTTP front
serves both engines with one code path. Closing a request's generator closes its connection
to llama-server, which stops that slot's generation at its next token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import ApplianceError, RefusalError, ServeError, WorkerCrashedError
from appliance.serve import assemble, tool_calls
from appliance.serve import llama_replies as replies
from appliance.serve.engine import (
    find_binary,
    free_port,
    gguf_facts,
    server_argv,
)
from appliance.serve.metrics import Metrics
from appliance.serve.model import ModelResolver, ServeSettings
from appliance.serve.queue import RequestQueue
from appliance.serve.supervisor import (
    FAILED,
    LOADING,
    MAX_BACKOFF,
    MIN_BACKOFF,
    READY,
    RESTARTING,
    STOPPED,
    Audit,
    Message,
    Worker,
    describe_exit,
)

log = logging.getLogger("appliance.serve")
llama_log = logging.getLogger("appliance.serve.llama")  # the child's own lines: DEBUG only

UNLOADED = "unloaded"  # not in memory; the next request loads it
LOG_TAIL = 30  # child log lines kept to explain a failed load or a crash


class LlamaServerWorker(Worker):
    """One model served by a llama-server child (see the module docstring)."""

    def __init__(self, name: str, resolver: ModelResolver, settings: ServeSettings, *,
                 metrics: Metrics, queue: RequestQueue, audit: Audit | None = None,
                 binary: Path, peers: dict[str, LlamaServerWorker] | None = None) -> None:
        super().__init__(name, resolver, settings, metrics=metrics, queue=queue, audit=audit)
        self.state = UNLOADED
        self.binary = binary
        self.peers = peers if peers is not None else {name: self}
        self.parallel = max(1, settings.parallel)
        self.last_used = 0.0
        self.busy = 0
        self.log_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self._slots = asyncio.Semaphore(self.parallel)
        self._child: subprocess.Popen[bytes] | None = None
        self._client: httpx.AsyncClient | None = None
        self._loading: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._crashed = False  # set by a crash: the next load counts as a restart

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def loaded(self) -> bool:
        return self.state in (LOADING, READY)

    def start(self) -> None:
        if self._settings.preload:
            self._begin_load()
        else:
            self._set_state(UNLOADED, "loads on its first request")

    async def stop(self) -> None:
        self._stopping = True
        if self._loading is not None:
            self._loading.cancel()
        await self._unload(STOPPED, "server stopping")

    def _begin_load(self) -> None:
        if self._loading is None or self._loading.done():
            self._set_state(LOADING, "")
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            await self._make_room()
            await self._launch_child()
        except RefusalError as e:
            self._refuse(e)
        except ApplianceError as e:
            log.error("model %s cannot be served: %s: %s", self.name, type(e).__name__, e)
            self._set_state(FAILED, f"{type(e).__name__}: {e}")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not leave the model "loading" forever
            log.exception("starting llama-server for model %s failed", self.name)
            self._set_state(FAILED, f"cannot start llama-server: {type(e).__name__}: {e}")

    async def _make_room(self) -> None:
        """Unload the least recently used idle model while ``max_loaded`` are loaded."""
        deadline = time.monotonic() + self._settings.ready_timeout
        while True:
            loaded = [w for w in self.peers.values() if w is not self and w.loaded]
            if self._settings.max_loaded <= 0 or len(loaded) < self._settings.max_loaded:
                return
            idle = sorted((w for w in loaded if w.busy == 0 and w.state == READY),
                          key=lambda w: w.last_used)
            if idle:
                log.info("unloading model %s to make room for %s (--max-loaded %d)",
                         idle[0].name, self.name, self._settings.max_loaded)
                await idle[0]._unload(UNLOADED, "unloaded to make room for another model")
                continue
            if time.monotonic() > deadline:
                raise ServeError(f"model '{self.name}' cannot load: --max-loaded "
                                 f"{self._settings.max_loaded} models are loaded and busy")
            await asyncio.sleep(0.1)

    async def _launch_child(self) -> None:
        model = await asyncio.to_thread(self._resolve)  # verify before every load
        self.model = model
        facts = await asyncio.to_thread(gguf_facts, model.path)
        port, key = free_port(), secrets.token_urlsafe(24)
        argv = self._argv(str(model.path), port, facts)
        env = {**os.environ, "LLAMA_API_KEY": key}
        # Its own session (a terminal's Ctrl-C reaches only us; we stop it in order), and
        # killed by the kernel if we die first: no orphan holding a model and a port.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        self._child = proc
        if self._crashed:
            self._metrics.worker_restarts[self.name] += 1
            self._crashed = False
        threading.Thread(target=self._read_log, args=(proc,), daemon=True,
                         name=f"appliance-llama-log-{self.name}").start()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._watch, args=(proc, loop), daemon=True,
                         name=f"appliance-llama-wait-{self.name}").start()
        log.info("llama-server for model %s started (pid %s, port %d), loading %s", self.name,
                 proc.pid, port, model.path)
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=self.parallel + 4),
        )
        await self._wait_child_ready(proc, facts)

    def _argv(self, path: str, port: int, facts: dict[str, Any]) -> list[str]:
        return server_argv(self.binary, path, port, self._settings, facts, alias=self.name)

    async def _wait_child_ready(self, proc: subprocess.Popen[bytes],
                                facts: dict[str, Any]) -> None:
        assert self._client is not None
        deadline = time.monotonic() + self._settings.ready_timeout
        while True:
            if proc.poll() is not None:
                return  # _on_exit reports it
            with contextlib.suppress(httpx.TransportError):
                response = await self._client.get("/health")
                if response.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServeError(f"llama-server did not load model '{self.name}' in "
                                 f"{self._settings.ready_timeout:.0f} s")
            await asyncio.sleep(0.05)
        info = dict(facts)
        with contextlib.suppress(httpx.TransportError, ValueError, KeyError, TypeError):
            props = (await self._client.get("/props")).json()
            info["n_ctx"] = int(props["default_generation_settings"]["n_ctx"])
            meta = (await self._client.get("/v1/models")).json()["data"][0].get("meta") or {}
            info.update({k: int(meta[k]) for k in ("n_params", "n_embd", "n_vocab", "size")
                         if k in meta})
        info["engine"] = "llama-server"
        info["parallel"] = self.parallel
        self.info = info
        log.info("model %s ready (%s, %d slots, n_ctx %s)", self.name, info.get("architecture"),
                 self.parallel, info.get("n_ctx"))
        self.last_used = time.monotonic()
        self._backoff = MIN_BACKOFF
        self._set_state(READY, "")
        self._arm_idle_timer()

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log_tail.append(line)
            llama_log.debug("[%s] %s", self.name, line)

    def _watch(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        code = proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            loop.call_soon_threadsafe(self._on_child_exit, proc, code)

    def _on_child_exit(self, proc: subprocess.Popen[bytes], code: int) -> None:
        if proc is not self._child:
            return  # an unload we asked for
        self._child = None
        self._close_client()
        what = describe_exit(code)
        if self.state == LOADING:
            tail = next((line for line in reversed(self.log_tail) if line.strip()), "")
            log.error("llama-server for model %s exited with %s while loading: %s",
                      self.name, what, tail)
            self._set_state(FAILED, f"load failed: llama-server exited with {what}: {tail}")
            return
        log.error("llama-server for model %s died with %s%s; it loads again on the next "
                  "request", self.name, what, " while answering requests" if self.busy else "")
        self._metrics.worker_crashes[(self.name, what.split(" ")[0])] += 1
        self._crashed = True
        if self._settings.preload and not self._stopping:
            # A preloaded model stays loaded: load it again now, backing off if it keeps dying.
            delay, self._backoff = self._backoff, min(self._backoff * 2, MAX_BACKOFF)
            self._set_state(RESTARTING, f"worker died with {what}; restarting")
            self._spawn_task(self._reload_after(delay))
            return
        self._set_state(UNLOADED, f"worker died with {what}; loads again on the next request")

    async def _reload_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopping:
            self._begin_load()

    async def _unload(self, state: str, detail: str) -> None:
        self._cancel_idle_timer()
        proc, self._child = self._child, None
        self._close_client()
        self._set_state(state, detail)
        if proc is not None:
            await asyncio.to_thread(_end, proc)
            log.info("model %s unloaded (%s)", self.name, detail)

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            asyncio.get_running_loop().create_task(client.aclose())

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        keep = self._settings.keep_alive
        if keep is None or keep < 0 or self.busy or self.state != READY:
            return
        self._idle_timer = asyncio.get_running_loop().call_later(keep, self._idle_unload)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_unload(self) -> None:
        self._idle_timer = None
        if self.busy == 0 and self.state == READY:
            self._spawn_task(self._unload(UNLOADED, f"idle for {self._settings.keep_alive:g} s"))

    async def scrape_metrics(self) -> str:
        client = self._client
        if client is None:
            return ""
        try:
            response = await client.get("/metrics", timeout=5.0)
        except httpx.TransportError:
            return ""
        return response.text if response.status_code == 200 else ""

    # -- requests --------------------------------------------------------------------------

    async def run(self, op: str, params: dict[str, Any]) -> AsyncGenerator[Message, None]:
        """Run one request on a free slot; yield messages up to its "done" or "error"."""
        await self._queue.acquire(self._slots)
        self.busy += 1
        self._cancel_idle_timer()
        try:
            if self.state == UNLOADED:
                self._begin_load()  # load on first request
            await self._wait_ready()
            self._check_capability(op)
            proc, client = self._child, self._client
            assert proc is not None and client is not None
            rid = next(self._ids)
            try:
                async for message in self._forward(client, rid, op, params):
                    yield message
            except httpx.TransportError as e:
                raise await self._transport_failure(proc, e) from e
        finally:
            self.busy -= 1
            self.last_used = time.monotonic()
            self._slots.release()
            self._arm_idle_timer()

    async def _transport_failure(self, proc: subprocess.Popen[bytes],
                                 error: httpx.TransportError) -> ApplianceError:
        # A dead child resets its connections before the kernel reports its exit: wait a bit.
        for _ in range(40):
            code = proc.poll()
            if code is not None:
                return WorkerCrashedError(
                    f"the llama.cpp worker for model '{self.name}' crashed with "
                    f"{describe_exit(code)} while answering this request; it loads again on "
                    "the next request")
            await asyncio.sleep(0.05)
        return ServeError(f"lost the connection to llama-server for model '{self.name}': "
                          f"{type(error).__name__}")

    async def _forward(self, client: httpx.AsyncClient, rid: int, op: str,
                       params: dict[str, Any]) -> AsyncGenerator[Message, None]:
        path = {"chat": "/v1/chat/completions", "completion": "/v1/completions",
                "embedding": "/v1/embeddings"}[op]
        calls = tool_calls.plan({**params, "model": self.name},
                                bool(self.info.get("template_tools")))
        body, streamed = calls.body, bool(calls.body.get("stream"))
        started = time.perf_counter()
        whole = calls.generic or not streamed  # the client gets one piece (or chunks of one)
        if op == "embedding" or (whole and body.get("logprobs")):
            # Asked whole from llama-server: an embedding has no stream, and a chat stream
            # sends no chunk, so no logprobs, for a token that adds no text (<unk>, a control
            # token, text held back as a possible stop string); the whole answer lists it.
            # Such a request notices a client leaving only at llama-server's next poll.
            response = await client.post(path, json={**body, "stream": False})
            payload = replies.json_body(response)
            if response.status_code != 200:
                yield replies.error_message(rid, response.status_code, payload)
                return
            payload["model"] = self.name
            messages = self._answer(rid, op, payload, calls.generic, streamed, started, None)
        else:
            # Streamed from llama-server, folded here when the client wants it whole: a
            # stream stops at its next token when the client leaves (see assemble.py).
            fold = assemble.Folded() if whole else None
            messages = []
            async for message in self._stream(client, rid, path, body, fold, started):
                if message[0] != "folded":
                    yield message
                    continue
                messages = self._answer(rid, op, fold.payload() if fold else {}, calls.generic,
                                        streamed, started, message[2])
        for message in messages:
            yield message

    def _answer(self, rid: int, op: str, payload: dict[str, Any], generic: bool,
                streamed: bool, started: float, first: float | None) -> list[Message]:
        """The messages for an answer llama-server gave (or we folded) whole."""
        if op == "embedding":
            return [("result", rid, payload)]
        if generic:
            payload = tool_calls.as_tool_call(payload)
        out: list[Message] = ([("chunk", rid, piece) for piece in tool_calls.as_chunks(payload)]
                              if streamed else [("result", rid, payload)])
        return [*out, ("done", rid, replies.stats(payload, started, first))]

    async def _stream(self, client: httpx.AsyncClient, rid: int, path: str,
                      body: dict[str, Any], fold: assemble.Folded | None,
                      started: float) -> AsyncGenerator[Message, None]:
        """Chunks as llama-server streams them, or into ``fold`` and then ("folded", rid,
        time of the first chunk)."""
        body = {**body, "stream": True,
                "stream_options": {"include_usage": True}}  # usage, timings for our metrics
        first: float | None = None
        final: dict[str, Any] = {}
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                payload = replies.json_bytes(await response.aread())
                yield replies.error_message(rid, response.status_code, payload)
                return
            async for line in response.aiter_lines():
                if line.startswith("error: "):  # llama-server's mid-stream error event
                    payload = replies.json_bytes(line[len("error: "):].encode())
                    yield replies.error_message(rid, 500, payload)
                    return
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    yield ("error", rid, "internal", str(chunk["error"].get("message", chunk)))
                    return
                if first is None:
                    first = time.perf_counter()
                chunk["model"] = self.name
                if fold is not None:
                    fold.add(chunk)
                    continue
                if chunk.get("usage") or chunk.get("timings"):
                    final = {**final, **{k: chunk[k] for k in ("usage", "timings") if k in chunk}}
                if not chunk.get("choices"):
                    continue  # the usage chunk: the front adds its own when the client asks
                chunk.pop("timings", None)
                chunk.pop("usage", None)
                yield ("chunk", rid, chunk)
        if fold is not None:
            yield ("folded", rid, first)
        else:
            yield ("done", rid, replies.stats(final, started, first))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _end(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def make_workers(settings: ServeSettings, resolver: ModelResolver, *, metrics: Metrics,
                 queue: RequestQueue, audit: Audit | None, engine: str) -> dict[str, Worker]:
    """One worker per served model, on ``engine`` (what ``resolve_engine`` chose)."""
    if engine == "llama-cpp-python":
        return {name: Worker(name, resolver, settings, metrics=metrics, queue=queue, audit=audit)
                for name in settings.models}
    binary = find_binary()
    assert binary is not None  # resolve_engine checked
    peers: dict[str, LlamaServerWorker] = {}
    for name in settings.models:
        peers[name] = LlamaServerWorker(name, resolver, settings, metrics=metrics, queue=queue,
                                        audit=audit, binary=binary, peers=peers)
    return dict(peers)


async def engine_metrics(workers: dict[str, Worker]) -> str:
    """llama-server's own ``/metrics`` of every loaded model, each sample labelled with its
    model (llama-server's names: ``llamacpp:prompt_tokens_total``, ...)."""
    texts = {worker.name: await worker.scrape_metrics() for worker in workers.values()
             if isinstance(worker, LlamaServerWorker) and worker.state == READY}
    return replies.merge_metrics(texts)
