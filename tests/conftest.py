"""Shared test fixtures: GGUF files made once per session, and the real default model.

- ``tiny_gguf``: a runnable tiny llama (seed 0, ChatML-like template), ~100 KiB.
- ``many_tensor_gguf``: a non-runnable GGUF with 200 tensors of mixed types, ~40 MB.
- ``gemma_gguf``: the real gemma-3-270m Q4_K_M file (253 MB), assembled once per machine
  into ``~/.cache/appliance-test/``; the test is skipped when the model package is absent.
- ``servers``: starts real peer servers on 127.0.0.1 (``servers(store, **kwargs)``, any
  ``peer_helpers.start_server`` argument), stopped when the test ends.
- ``two_signer_media``: a bundle on media (per test, in ``tmp_path``) holding acme/tiny: the
  tiny GGUF and a text file, signed by publishers p1 and p2, carrying ``make_root()``.

Treat the session files as read-only: copy one to tmp_path before editing it.

Every test bundle is made by ``bundle_helpers``: on media by ``build`` (the real builder,
deterministic keys), as a signed manifest without media, to seed stores and peers, by
``make_bundle`` (``peer_helpers.seed`` writes it into a store). A store that trusts the test
root is made by ``trust_helpers.trusted_store``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import build, make_sources, write_recipe
from gguf_fixtures import write_many_tensor_gguf, write_tiny_llama
from peer_helpers import start_server

from appliance.errors import UsageError
from appliance.peer.server import PeerServer

GEMMA_CACHE = Path.home() / ".cache" / "appliance-test"


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def tiny_gguf(gguf_dir: Path) -> Path:
    return write_tiny_llama(gguf_dir / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def many_tensor_gguf(gguf_dir: Path) -> Path:
    return write_many_tensor_gguf(gguf_dir / "many-tensor.gguf")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    from appliance.default_model import default_model_path

    try:
        return default_model_path(GEMMA_CACHE)
    except UsageError as e:
        pytest.skip(f"real default model unavailable: {e}")


@pytest.fixture()
def two_signer_media(tmp_path: Path, tiny_gguf: Path) -> Path:
    make_sources(tmp_path, tiny_gguf, random_mib=1)
    recipe = write_recipe(tmp_path, files=("tiny.gguf", "notes.txt"))
    build(tmp_path, keys=("p1", "p2"), recipe=recipe)
    return tmp_path / "media"


@pytest.fixture
def servers() -> Iterator[Callable[..., PeerServer]]:
    with ExitStack() as stack:
        def start(store: Path, **kwargs: Any) -> PeerServer:
            server = start_server(store, **kwargs)
            stack.callback(server.stop)
            return server
        yield start
