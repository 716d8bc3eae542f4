"""Helpers for the serve tests: a real uvicorn on 127.0.0.1:0 in a thread, resolvers, GGUF edits.

``running_server`` starts the real app (real worker processes, real llama.cpp) and waits for
/health; ``file_resolver`` serves files by name without a store; ``copy_gguf_with`` rewrites a
GGUF adding metadata keys (the tiny llama plus ``llama.pooling_type`` is an embedding model);
``appliance_serve`` runs the real ``appliance serve`` command as its own process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import httpx

from appliance.errors import ModelNotFoundError
from appliance.http_server import ServerOptions
from appliance.serve.app import create_app
from appliance.serve.model import ServableModel, ServeSettings
from appliance.serve.server import SERVE_OPTIONS, ServerThread
from appliance.serve.worker import TEST_HOOK_ENV

Audit = Callable[[str, dict[str, Any]], None]


def file_resolver(files: dict[str, Path]) -> Callable[[str], ServableModel]:
    def resolve(name: str) -> ServableModel:
        path = files.get(name)
        if path is None:
            raise ModelNotFoundError(f"no model {name!r}")
        return ServableModel(name, path, path.stat().st_size, f"test-{name}")

    return resolve


def wait_health(url: str, timeout: float = 120.0, want: int = 200) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=10)
        except httpx.TransportError as e:  # not listening yet
            last = e
            time.sleep(0.05)
            continue
        last = response.json()
        if response.status_code == want:
            return dict(last)
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {want}: {last}")


@contextlib.contextmanager
def running_server(
    files: dict[str, Path],
    *,
    hook: str | None = None,
    audit: Audit | None = None,
    wait: bool = True,
    resolver: Callable[[str], ServableModel] | None = None,
    options: ServerOptions = SERVE_OPTIONS,
    **settings: Any,
) -> Iterator[ServerThread]:
    """The app on an ephemeral loopback port; ``hook`` sets the worker's test hook, ``options``
    the connection limits."""
    settings.setdefault("n_threads", 2)
    settings.setdefault("n_ctx", 256)
    app = create_app(
        ServeSettings(models=tuple(files), **settings),
        resolver or file_resolver(files),
        audit=audit,
    )
    old = os.environ.get(TEST_HOOK_ENV)
    if hook is not None:
        os.environ[TEST_HOOK_ENV] = hook
    try:
        with ServerThread(app, options=options) as server:
            # Spawned workers read the environment when they start: keep it set meanwhile.
            if wait:
                wait_health(server.url)
            yield server
    finally:
        if old is None:
            os.environ.pop(TEST_HOOK_ENV, None)
        else:
            os.environ[TEST_HOOK_ENV] = old


def metric(url: str, line_prefix: str, headers: dict[str, str] | None = None) -> float:
    """Value of the first /metrics sample starting with ``line_prefix`` (0 when absent)."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def copy_gguf_with(src: Path, dst: Path, extra_u32: dict[str, int] | None = None, *,
                   extra_bool: dict[str, bool] | None = None, split_max_tensors: int = 0) -> Path:
    """Rewrite ``src`` to ``dst`` with the same keys and tensors plus the extra keys.

    ``split_max_tensors``: write a split GGUF instead, as llama.cpp's gguf-split does
    (``DST-00001-of-0000N.gguf``..., at most that many tensors each); returns the first shard.
    """
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch, split_max_tensors=split_max_tensors)
    for kv in reader.fields.values():
        if kv.name.startswith("GGUF.") or kv.name == "general.architecture":
            continue
        kind = kv.types[0]
        sub_type = kv.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(kv.name, kv.contents(), kind, sub_type=sub_type)
    for key, value in (extra_u32 or {}).items():
        writer.add_uint32(key, value)
    for key, flag in (extra_bool or {}).items():
        writer.add_bool(key, flag)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape,
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(dst)[0]


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)


@contextlib.contextmanager
def appliance_serve(store: Path, *args: str) -> Iterator[ServeProcess]:
    """``appliance serve`` as its own process on 127.0.0.1:0; stopped with SIGTERM."""
    cmd = [sys.executable, "-m", "appliance.cli.main", "--store", str(store), "serve",
           "--listen", "127.0.0.1:0", "--threads", "2", "--ctx", "256", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if re.search(r"serving .* on http://", line):
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(60):
            raise AssertionError(f"appliance serve did not start: {''.join(log)}")
        url = re.search(r"on (http://\S+)", "".join(log))
        assert url is not None
        yield ServeProcess(proc, url.group(1), log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
