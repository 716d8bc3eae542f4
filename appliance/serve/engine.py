"""Which serving engine runs, and how llama.cpp's ``llama-server`` is found and started.

``resolve_engine`` picks llama-server (``serve/llama_server.py``) when it is built, else the
llama-cpp-python worker (``serve/worker.py``). ``find_binary`` looks where
``scripts/build_llama_server.sh`` installs it (beside the venv's interpreter), in the PyInstaller
bundle, then on PATH. ``server_argv`` is the one llama-server command line for a model (the
benchmark runs the same one alone), ``gpu_devices`` what llama.cpp's backends see.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.errors import ServeError
from appliance.serve.chat_templates import fallback_template_file
from appliance.serve.model import ServeSettings
from appliance.serve.worker import ENCODER_ARCHITECTURES

BINARY_ENV = "APPLIANCE_LLAMA_SERVER"
BINARY_NAME = "llama-server"
NOT_BUILT = "llama-server is not built: run scripts/build_llama_server.sh"

def find_binary() -> Path | None:
    """The llama-server to run: $APPLIANCE_LLAMA_SERVER, the one beside this interpreter (the
    venv's, installed by build_llama_server.sh), the PyInstaller bundle's, else PATH's."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    candidates = [Path(sys.executable).parent / BINARY_NAME]
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        candidates.insert(0, Path(bundle) / BINARY_NAME)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(BINARY_NAME)
    return Path(found) if found else None


@functools.lru_cache(maxsize=4)
def gpu_devices(binary: Path) -> list[str]:
    """The GPU devices llama.cpp's backends see (``llama-server --list-devices``): empty on a
    CPU-only build or host."""
    try:
        out = subprocess.run([str(binary), "--list-devices"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    devices, listing = [], False
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("Available devices"):
            listing = True
        elif listing and line.startswith("  ") and line.strip() not in ("", "(none)"):
            devices.append(line.strip())
    return devices


def gpu_layers_arg(setting: str, binary: Path) -> str:
    """``--gpu-layers`` for llama-server: ``auto`` means every layer when a GPU is there."""
    if setting != "auto":
        return setting
    return "all" if gpu_devices(binary) else "0"


def gguf_facts(path: Path) -> dict[str, Any]:
    """What the front must know before starting the child: architecture, whether it embeds."""
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key: str) -> Any:
        item = reader.fields.get(key)
        return item.contents() if item is not None else None

    architecture = str(field("general.architecture") or "")
    pooling = field(f"{architecture}.pooling_type")
    embeddings = architecture in ENCODER_ARCHITECTURES or pooling not in (None, 0)
    return {
        "architecture": architecture,
        "embeddings": embeddings,
        "generation": architecture not in ENCODER_ARCHITECTURES,
        "chat_template": field("tokenizer.chat_template") is not None,
        # A template that never mentions tools cannot render them (see serve/tool_calls.py).
        "template_tools": "tools" in str(field("tokenizer.chat_template") or ""),
        "n_ctx_train": int(field(f"{architecture}.context_length") or 0),
    }


def server_argv(binary: Path, path: str, port: int, s: ServeSettings, facts: dict[str, Any],
                *, alias: str) -> list[str]:
    """The llama-server command line for one model (the benchmark runs the same one alone)."""
    parallel = max(1, s.parallel)
    # llama-server splits --ctx-size across its slots: each slot gets the context asked for.
    ctx = s.n_ctx * parallel if s.n_ctx else 0
    argv = [str(binary), "--model", path, "--alias", alias,
            "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--ctx-size", str(ctx),
            "--threads", str(s.n_threads), "--threads-batch", str(s.n_threads),
            "--gpu-layers", gpu_layers_arg(s.gpu_layers, binary),
            "--jinja", "--metrics", "--no-webui"]
    template = None if facts["chat_template"] else fallback_template_file(
        str(facts["architecture"]))
    if template is not None:  # llama-server would use ChatML, wrong for gemma
        argv += ["--chat-template-file", str(template)]
    if facts["embeddings"]:
        # A non-causal model embeds a whole input in one batch.
        batch = str(s.n_ctx or 2048)
        argv += ["--embeddings", "--batch-size", batch, "--ubatch-size", batch]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


ENGINES: Sequence[str] = ("auto", "llama-server", "llama-cpp-python")


def resolve_engine(engine: str) -> str:
    """``auto``: llama-server when it is built, else the llama-cpp-python worker."""
    if engine not in ENGINES:
        raise ServeError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "llama-server" if find_binary() is not None else "llama-cpp-python"
    if engine == "llama-server" and find_binary() is None:
        raise ServeError("the llama-server engine is not built: run "
                         "scripts/build_llama_server.sh (or set $APPLIANCE_LLAMA_SERVER)")
    return engine


def parse_keep_alive(text: str) -> float | None:
    """``--keep-alive``: seconds, or with a unit (``30s``, ``5m``, ``1h``); negative: never."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, scale = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(number) * scale
    except ValueError as e:
        raise ValueError(f"--keep-alive takes seconds or 30s, 5m, 1h; not {text!r}") from e
    return None if seconds < 0 else seconds
