"""Crash safety for real: SIGKILL the importer at seeded random moments, check, resume.

Each run imports a multi-volume bundle (a ~25 MB many-tensor GGUF) into a fresh store in a
child process, kills it with SIGKILL after a random delay, checks that the index and the
files agree (every chunk marked done is on disk and correct; nothing published is missing;
no stray staged file), then resumes in this process and checks the same verified file comes
out. The child slows itself a little after each chunk (a progress callback) so the kills
land throughout the copy, including around publish.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import signal
import time
from pathlib import Path

import pytest
from bundle_helpers import NOW, build, make_sources, write_recipe
from gguf_fixtures import write_many_tensor_gguf
from importer_helpers import check_consistent, run_import_child
from trust_helpers import trusted_store

from appliance.importer import import_media
from appliance.store import audit
from appliance.store.records import get_model

MIB = 1 << 20
SEED = 20250
MIN_KILLS = 20
MAX_RUNS = 40
PAUSE = 0.006  # seconds the child waits after each chunk, so kills spread over the copy


@pytest.fixture(scope="module")
def many_tensor_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build directory: a ~25 MB many-tensor GGUF (~50 tensor-aligned chunks) in ``models/``,
    its bundle over several volumes in ``media/``."""
    base = tmp_path_factory.mktemp("crash-bundle")
    gguf = write_many_tensor_gguf(base / "many.gguf", n_tensors=90)
    make_sources(base, gguf, random_mib=1)
    build(base, recipe=write_recipe(base, files=("tiny.gguf",)), volume_size=16 * MIB)
    return base


# Children come from a fork server that has imported appliance but never hashed anything:
# forking this test process after blake3 has started its worker threads would hang a child.
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["importer_helpers", "appliance.importer"])


def child(store: Path, media: list[Path]) -> multiprocessing.process.BaseProcess:
    """Start the importer in a child; return once it is running."""
    started = CONTEXT.Event()
    proc = CONTEXT.Process(
        target=run_import_child, args=(str(store), [str(m) for m in media], PAUSE, MIB, started)
    )
    proc.start()
    assert started.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(many_tensor_build: Path, tmp_path: Path) -> None:
    source = hashlib.sha256((many_tensor_build / "models" / "tiny.gguf").read_bytes()).hexdigest()
    volumes = sorted((many_tensor_build / "media").glob("vol-*"))
    assert len(volumes) >= 2
    rng = random.Random(SEED)

    # Calibrate: how long one whole child import takes on this machine right now.
    child(trusted_store(tmp_path / "warm-up"), volumes).join()  # starts the fork server
    proc = child(trusted_store(tmp_path / "calibration"), volumes)
    started = time.perf_counter()
    proc.join()
    assert proc.exitcode == 0
    whole = time.perf_counter() - started

    kills = 0
    mid_copy = 0
    runs = 0
    while kills < MIN_KILLS and runs < MAX_RUNS:
        runs += 1
        store = trusted_store(tmp_path / f"store-{runs}")
        order = rng.sample(volumes, len(volumes))  # any volume order
        proc = child(store, order)
        time.sleep(rng.uniform(0.0, whole))
        proc.kill()  # SIGKILL; harmless if it already finished
        proc.join()
        if proc.exitcode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.exitcode == 0
        counts = check_consistent(store)
        if counts["done_chunks"] and not counts["published_files"]:
            mid_copy += 1
        result = import_media(store, order, now=NOW)
        assert result.complete
        model = get_model(store, "acme/tiny")
        assert hashlib.sha256(model.path.read_bytes()).hexdigest() == source
        assert check_consistent(store)["published_files"] == 1  # re-hashes every chunk
        audit.verify(store)
    assert kills >= MIN_KILLS, f"only {kills} of {runs} runs were killed mid-import"
    assert mid_copy >= 3, f"only {mid_copy} kills landed while chunks were being copied"
