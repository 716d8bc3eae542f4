"""Server side of a worker: spawn it, route its messages, notice its death, restart it.

One ``Worker`` per served model. It owns the child process (see ``appliance.serve.worker`` for
the pipe protocol), a reader thread that turns blocking ``recv()`` into event-loop messages,
and a lock that lets one request run at a time. Before every (re)load the model is resolved
again (the store's checks) and its file checked (``check_file``); a refused model is never
spawned. When the child dies, the request it was running fails with ``WorkerCrashedError``
naming the signal, the death is logged and counted, and a new child is started after a
back-off that grows only while it keeps dying before it is ready (a crash loop at load); a
worker that dies answering a request is replaced at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from appliance.errors import (
    ApplianceError,
    BadRequestError,
    RefusalError,
    ServeError,
    WorkerCrashedError,
)
from appliance.serve.metrics import Metrics
from appliance.serve.model import ModelResolver, ServableModel, ServeSettings, check_file
from appliance.serve.queue import RequestQueue
from appliance.serve.worker import WorkerSpec

log = logging.getLogger("appliance.serve")

Audit = Callable[[str, dict[str, Any]], None]
Message = tuple[Any, ...]

LOADING, READY, RESTARTING, REFUSED, FAILED, STOPPED = (
    "loading", "ready", "restarting", "refused", "failed", "stopped",
)
_TERMINAL = frozenset({REFUSED, FAILED, STOPPED})
MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0


def describe_exit(code: int | None) -> str:
    """'SIGSEGV (signal 11)' for a signal death, 'exit status N' otherwise."""
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"{signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class Worker:
    def __init__(
        self,
        name: str,
        resolver: ModelResolver,
        settings: ServeSettings,
        *,
        metrics: Metrics,
        queue: RequestQueue,
        audit: Audit | None = None,
    ) -> None:
        self.name = name
        self.state = STOPPED
        self.detail = ""
        self.info: dict[str, Any] = {}
        self.model: ServableModel | None = None
        self._resolver = resolver
        self._settings = settings
        self._metrics = metrics
        self._queue = queue
        self._audit = audit
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._current: tuple[int, asyncio.Queue[Message]] | None = None
        self._draining: int | None = None  # request abandoned by its client, still running
        self._backoff = MIN_BACKOFF
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._set_state(LOADING, "")
        self._spawn_task(self._launch(delay=0.0))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def stop(self) -> None:
        self._stopping = True
        self._set_state(STOPPED, "server stopping")
        for task in list(self._tasks):
            task.cancel()
        proc, conn = self._proc, self._conn
        if conn is not None:
            # Closing our end would not wake the reader thread blocked in recv(); asking the
            # worker to exit closes its end, which ends both.
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        if proc is not None:
            await asyncio.to_thread(_reap, proc)
        if conn is not None:
            conn.close()

    async def _launch(self, delay: float) -> None:
        try:
            await self._launch_once(delay)
        except Exception as e:  # a bug must not leave the model "loading" forever
            log.exception("starting the worker for model %s failed", self.name)
            self._set_state(FAILED, f"cannot start a worker: {type(e).__name__}: {e}")

    async def _launch_once(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            model = await asyncio.to_thread(self._resolve)
        except RefusalError as e:
            self._refuse(e)
            return
        except ApplianceError as e:
            log.error("model %s cannot be served: %s: %s", self.name, type(e).__name__, e)
            self._set_state(FAILED, f"{type(e).__name__}: {e}")
            return
        self.model = model
        spec = WorkerSpec(self.name, str(model.path), self._settings.n_ctx,
                          self._settings.n_threads)
        try:
            proc, parent_end = spawn_worker(spec)
        except OSError as e:
            log.error("cannot start a worker for model %s: %s", self.name, e)
            self._set_state(FAILED, f"cannot start a worker process: {e}")
            return
        if self._stopping:  # stop() ran while the process was starting
            with contextlib.suppress(OSError):
                parent_end.send(("stop",))
            await asyncio.to_thread(_reap, proc)
            parent_end.close()
            return
        self._proc, self._conn = proc, parent_end
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=_read_pipe, args=(parent_end, proc, inbox, loop),
            name=f"appliance-pipe-{self.name}", daemon=True,
        ).start()
        log.info("worker for model %s started (pid %s), loading %s", self.name, proc.pid,
                 model.path)
        self._spawn_task(self._pump(inbox))

    def _resolve(self) -> ServableModel:
        model = self._resolver(self.name)
        check_file(model)
        return model

    def _refuse(self, error: RefusalError) -> None:
        reason = f"{type(error).__name__}: {error}"
        log.error("model %s refused, not loading it: %s", self.name, reason)
        self._set_state(REFUSED, reason)
        if self._audit is not None:
            try:
                self._audit("refusal", {"action": "serve-load", "model": self.name,
                                        "error": type(error).__name__, "reason": str(error)})
            except ApplianceError as e:
                log.error("could not audit the refusal of %s: %s", self.name, e)

    # -- messages from the child -----------------------------------------------------------

    async def _pump(self, inbox: asyncio.Queue[Message]) -> None:
        while True:
            message = await inbox.get()
            kind = message[0]
            if kind == "ready":
                self.info = message[1]
                log.info("model %s ready (%s, n_ctx %s)", self.name,
                         self.info.get("architecture"), self.info.get("n_ctx"))
                if not self.info.get("chat_template"):
                    log.warning("model %s has no chat template in its GGUF; chat uses the "
                                "built-in '%s' format", self.name, self.info.get("chat_format"))
                self._set_state(READY, "")
            elif kind == "load_failed":
                log.error("model %s failed to load: %s", self.name, message[1])
                self._set_state(FAILED, f"load failed: {message[1]}")
            elif kind == "exit":
                self._on_exit(message[1])
                return
            else:
                self._route(message)

    def _route(self, message: Message) -> None:
        rid = message[1]
        if self._current is not None and self._current[0] == rid:
            self._current[1].put_nowait(message)
        if message[0] in ("done", "error") and self._draining == rid:
            if message[0] == "done":
                self._metrics.observe_generation(self.name, message[2])
            self._draining = None
            self._current = None
            self._lock.release()

    def _on_exit(self, code: int | None) -> None:
        self._proc = self._conn = None
        if self.state in _TERMINAL:
            return  # stopping, or a load failure already reported
        what = describe_exit(code)
        busy = self._current is not None
        log.error("worker for model %s died with %s%s; restarting it", self.name, what,
                  " while answering a request" if busy else "")
        self._metrics.worker_crashes[(self.name, what.split(" ")[0])] += 1
        if self._current is not None:
            self._current[1].put_nowait(("exit", code))
        if self._draining is not None:
            self._draining = None
            self._current = None
            self._lock.release()
        if self.state == READY:  # it had loaded: a request killed it, not a crash loop
            self._backoff = MIN_BACKOFF
            delay = 0.0
        else:
            delay = self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        self._set_state(RESTARTING, f"worker died with {what}; restarting")
        self._metrics.worker_restarts[self.name] += 1
        self._spawn_task(self._launch(delay))

    # -- requests --------------------------------------------------------------------------

    async def run(self, op: str, params: dict[str, Any]) -> AsyncGenerator[Message, None]:
        """Run one request; yield the worker's messages up to its "done" or "error".

        Waits in line (``QueueFullError`` when the line is full) and for a (re)loading worker.
        Raises ``WorkerCrashedError`` if the worker dies meanwhile.
        """
        await self._queue.acquire(self._lock)
        rid: int | None = None
        finished = False
        try:
            await self._wait_ready()
            self._check_capability(op)
            assert self._conn is not None
            rid = next(self._ids)
            inbox: asyncio.Queue[Message] = asyncio.Queue()
            self._current = (rid, inbox)
            with contextlib.suppress(OSError):  # a dead worker is reported by its "exit"
                self._conn.send(("run", rid, op, params))
            while True:
                message = await inbox.get()
                if message[0] == "exit":
                    finished = True
                    raise WorkerCrashedError(
                        f"the llama.cpp worker for model '{self.name}' crashed with "
                        f"{describe_exit(message[1])} while answering this request; "
                        "it is restarting"
                    )
                if message[0] in ("done", "error"):
                    finished = True
                yield message
                if finished:
                    return
        finally:
            if rid is not None and not finished and self._conn is not None:
                # The client left mid-request: stop the worker and keep the lock until it
                # confirms, so the next request never sees this one's tokens.
                self._draining = rid
                with contextlib.suppress(OSError):
                    self._conn.send(("cancel", rid))
            else:
                self._current = None
                self._lock.release()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._settings.ready_timeout
        while self.state != READY:
            if self.state == REFUSED:
                raise RefusalError(f"model '{self.name}' was refused and is not served: "
                                   f"{self.detail}")
            if self.state in _TERMINAL:
                raise ServeError(f"model '{self.name}' is not available: {self.detail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServeError(f"model '{self.name}' is not ready ({self.state}: "
                                 f"{self.detail or 'loading'})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _check_capability(self, op: str) -> None:
        architecture = self.info.get("architecture") or "unknown"
        if op == "embedding" and not self.info.get("embeddings"):
            raise BadRequestError(
                f"model '{self.name}' does not support embeddings: it is a {architecture} text "
                "generation model whose GGUF declares no pooling type; serve an embedding "
                "model for /v1/embeddings"
            )
        if op != "embedding" and not self.info.get("generation", True):
            raise BadRequestError(
                f"model '{self.name}' is an embedding model ({architecture}); it cannot "
                "generate text, use /v1/embeddings"
            )

    def _set_state(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def spawn_worker(spec: WorkerSpec) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start ``python -m appliance.serve.worker`` with one end of a socket pair.

    A fresh interpreter (not multiprocessing's spawn) so the worker never re-imports the
    server's ``__main__`` (a script, a notebook, the CLI); it gets the server's sys.path, and
    its stdout goes to the server's stderr, where the logs are.
    """
    parent_sock, child_sock = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.serve.worker", str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, stdout=2, env=env,
        )
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    conn = Connection(parent_sock.detach())
    conn.send(asdict(spec))
    return proc, conn


def _read_pipe(
    conn: Connection, proc: subprocess.Popen[bytes], inbox: asyncio.Queue[Message],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Thread: forward the child's messages to the loop, then its exit code when it dies."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, message)
        except RuntimeError:  # the loop is closed: the server is gone
            return
    try:
        code: int | None = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # it closed the pipe but lingers: end it
        proc.kill()
        code = proc.wait()
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(inbox.put_nowait, ("exit", code))


def _reap(proc: subprocess.Popen[bytes]) -> None:
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            action()
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
