"""What the server needs to know about a model, and the settings it serves with.

The server never reads the store itself: it asks a ``ModelResolver`` (built by the CLI from
the store, or by a test from a file) for a ``ServableModel`` every time it is about to load a
worker, at start and after each crash. The resolver does the store's checks (published,
verified, identity, full re-hash when asked) and raises ``ModelNotFoundError`` or a
``RefusalError`` (usually ``IntegrityError``); ``check_file`` adds the server's own cheap check
just before the worker opens the file, and every shard of a split GGUF (``appliance.gguf_split``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import IntegrityError, TruncatedError
from appliance.limits import DEFAULT_LIMITS


@dataclass(frozen=True)
class ModelFile:
    """One file llama.cpp opens for a model, with the size the store recorded."""

    path: Path
    size: int


@dataclass(frozen=True)
class ServableModel:
    """A model the store vouches for: the file llama.cpp is given, its size and identity.

    A split GGUF is given by its first shard (``path``); llama.cpp opens the other shards by
    name from the same directory. ``shards`` then lists every shard in order (the first is
    ``path``), ``size`` is their total and ``identity`` covers them all (``split_identity``).
    """

    name: str
    path: Path
    size: int
    identity: str
    shards: tuple[ModelFile, ...] = ()

    @property
    def files(self) -> tuple[ModelFile, ...]:
        """Every file the engine will open: the shards, or the one file."""
        return self.shards or (ModelFile(self.path, self.size),)


# name -> ServableModel; raises ModelNotFoundError, or RefusalError when the model must not load.
ModelResolver = Callable[[str], ServableModel]


# The context a model is loaded with unless told otherwise: `appliance serve --ctx` and the
# TUI's Serve screen both start from it.
DEFAULT_N_CTX = 4096
# How a model is checked before it is loaded (store_resolver); here so that the CLI's parser
# can offer them without importing the serving stack.
VERIFY_MODES = ("quick", "full")


@dataclass(frozen=True)
class ServeSettings:
    """How the server runs; the CLI fills it from its options, tests build it directly."""

    models: tuple[str, ...]
    n_threads: int = 2
    n_ctx: int = DEFAULT_N_CTX  # 0: the model's training context
    max_queue: int = 16  # requests waiting for a busy worker; more get 429
    max_tokens_default: int = 256  # tokens a chat completion generates when it names no cap
    api_keys: frozenset[str] = field(default_factory=frozenset)
    ready_timeout: float = 120.0  # how long a queued request waits for a (re)loading worker
    max_request_bytes: int = DEFAULT_LIMITS.max_request_bytes
    listen: str = ""  # informational: recorded in the serve-start audit record
    # The engine (serve/llama_server.py): "llama-server", "llama-cpp-python" (the in-process
    # worker.py, one request at a time) or "auto" (llama-server when it is built).
    engine: str = "llama-cpp-python"
    parallel: int = 1  # llama-server slots per model: requests generated at once
    gpu_layers: str = "auto"  # layers offloaded: a number, or auto (all with a GPU, else 0)
    keep_alive: float | None = None  # idle seconds before a model unloads; None: never
    max_loaded: int = 0  # models loaded at once (least recently used unloads); 0: no limit
    preload: bool = True  # load every model at start (else on its first request)
    cors_origins: tuple[str, ...] = ()  # origins allowed by CORS (none: no CORS headers)


def check_file(model: ServableModel) -> None:
    """Refuse a model whose file (any shard of a split GGUF) is missing, not a regular file,
    or not the recorded size."""
    for part in model.files:
        _check_one(model.name, part)


def _check_one(name: str, part: ModelFile) -> None:
    try:
        st = os.stat(part.path)
    except OSError as e:
        raise IntegrityError(
            f"model '{name}' file is unreadable: {e.strerror}", file=str(part.path)
        ) from e
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"model '{name}' is not a regular file", file=str(part.path))
    if st.st_size < part.size:
        raise TruncatedError(
            f"model '{name}' is {st.st_size} bytes, the store recorded {part.size}",
            file=str(part.path),
        )
    if st.st_size != part.size:
        raise IntegrityError(
            f"model '{name}' is {st.st_size} bytes, the store recorded {part.size}",
            file=str(part.path),
        )
