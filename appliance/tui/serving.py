"""The Serve screen's controller: the inference server in this process, and its client side.

Starts the same server as ``appliance serve`` (``appliance.serve.app.create_app`` with the
store resolver, so only published, verified models load, and the serve-start audit record)
under uvicorn in a background thread (``ServerThread``), then talks to it over HTTP on
loopback like any client: /health, /metrics, /v1/chat/completions (with one of the API keys
when the operator gave a key file). Every call blocks; the screen calls them from worker
threads. The server lives in the TUI's process: it stops when the TUI quits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import ServeError, UsageError
from appliance.serve.app import create_app
from appliance.serve.auth import load_api_keys
from appliance.serve.model import DEFAULT_N_CTX, ServeSettings
from appliance.serve.server import ServerThread
from appliance.serve.store_resolver import servable_names, serve_audit, store_resolver

METRICS = {
    "appliance_serve_tokens_generated_total": "tokens generated",
    "appliance_serve_tokens_per_second": "tokens/s (last)",
    "appliance_serve_time_to_first_token_seconds": "first token s (last)",
    "appliance_serve_queue_depth": "queued",
    "appliance_serve_requests_in_flight": "in flight",
    "appliance_serve_worker_restarts_total": "worker restarts",
}


@dataclass(frozen=True)
class ServeStatus:
    url: str | None  # None when stopped
    state: str  # stopped | loading | ok | unavailable
    models: dict[str, dict[str, Any]]
    metrics: dict[str, float]


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of each known metric family's samples (all models together)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return out


def prepare_spawning() -> None:
    """Start multiprocessing's resource tracker now, before Textual runs.

    While a Textual app runs, ``sys.stderr`` is a capture object whose ``fileno()`` is -1;
    a tracker started then passes -1 to ``fork_exec`` and every spawned llama.cpp worker
    fails with "bad value(s) in fds_to_keep". Started beforehand, it is reused.
    """
    resource_tracker.ensure_running()


def default_threads() -> int:
    """llama.cpp threads per model, as ``appliance serve`` defaults: the CPUs, at most 8."""
    return min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServeOptions:
    """What the operator chose in the start dialog (the CLI's ``serve`` options)."""

    models: tuple[str, ...] = ()  # empty: every verified model in the store
    listen: str = "127.0.0.1:0"
    n_threads: int = 0  # 0: default_threads()
    n_ctx: int = DEFAULT_N_CTX  # 0: the model's own
    api_key_file: Path | None = None


class ServeController:
    """One server at a time; ``start`` and ``stop`` from a worker thread."""

    def __init__(self, store_dir: Path, options: ServeOptions | None = None) -> None:
        self.store_dir = store_dir
        self.options = options or ServeOptions()
        self.server: ServerThread | None = None
        self.models: tuple[str, ...] = ()
        self._headers: dict[str, str] = {}  # our own requests' API key, when keys are set

    @property
    def running(self) -> bool:
        return self.server is not None

    @property
    def url(self) -> str | None:
        return self.server.url if self.server else None

    def start(self, options: ServeOptions | None = None, *, wait: float = 120.0,
              cancelled: Callable[[], bool] = lambda: False) -> ServeStatus:
        if self.server is not None:
            raise UsageError(f"the server is already running at {self.server.url}")
        options = options or self.options
        if options.n_threads < 0 or options.n_ctx < 0:
            raise UsageError("threads and context must be 0 (the default) or positive")
        keys = (load_api_keys(options.api_key_file) if options.api_key_file
                else frozenset[str]())
        names = servable_names(self.store_dir, options.models)
        settings = ServeSettings(models=names, n_threads=options.n_threads or default_threads(),
                                 n_ctx=options.n_ctx, api_keys=keys, listen=options.listen)
        app = create_app(settings, store_resolver(self.store_dir),
                         audit=serve_audit(self.store_dir, via="tui"))
        server = ServerThread(app, options.listen)
        server.__enter__()
        self.options = replace(options, models=names)
        self._headers = {"Authorization": f"Bearer {min(keys)}"} if keys else {}
        self.server, self.models = server, names
        deadline = time.monotonic() + wait
        status = self.status()
        while status.state == "loading" or status.state == "starting":
            if cancelled() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
            status = self.status()
        return status

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()

    def status(self) -> ServeStatus:
        if self.server is None:
            return ServeStatus(None, "stopped", {}, {})
        url = self.server.url
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            metrics = httpx.get(f"{url}/metrics", timeout=5, headers=self._headers)
        except httpx.HTTPError:
            return ServeStatus(url, "starting", {}, {})
        body = health.json()
        return ServeStatus(url, str(body.get("status", "unavailable")),
                           dict(body.get("models", {})), parse_metrics(metrics.text))

    def chat(self, model: str, message: str, *, max_tokens: int = 48) -> str:
        if self.server is None:
            raise UsageError("start the server first (s)")
        body = {"model": model, "messages": [{"role": "user", "content": message}],
                "max_tokens": max_tokens, "temperature": 0}
        try:
            response = httpx.post(f"{self.server.url}/v1/chat/completions", json=body,
                                  timeout=120, headers=self._headers)
        except httpx.HTTPError as e:
            raise ServeError(f"the server did not answer: {e}") from e
        data = response.json()
        if response.status_code != 200:
            message_text = data.get("error", {}).get("message", response.text)
            raise ServeError(f"HTTP {response.status_code}: {message_text}")
        return str(data["choices"][0]["message"]["content"])
