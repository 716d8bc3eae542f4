"""The issue's "done when", on the real gemma3-270m model (skipped when it is not installed).

A two-volume bundle of the real model imports with the volumes given in reverse order and
resumes after a SIGKILL; the imported file is byte-identical to the source; ``store verify``
catches a byte flipped in the published file; ``audit verify`` catches an edited record.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from bundle_helpers import NOW, build, write_recipe
from importer_helpers import check_consistent, run_import_child
from trust_helpers import trusted_store

from appliance.default_model import MODEL_SHA256
from appliance.errors import AuditChainError
from appliance.importer import import_media
from appliance.store import audit
from appliance.store.records import get_model
from appliance.store.scrub import verify_store

MIB = 1 << 20
CONTEXT = multiprocessing.get_context("forkserver")


@pytest.fixture(scope="module")
def gemma_media(tmp_path_factory: pytest.TempPathFactory, gemma_gguf: Path) -> Path:
    base = tmp_path_factory.mktemp("gemma")
    models = base / "models"
    models.mkdir()
    (models / gemma_gguf.name).symlink_to(gemma_gguf)
    recipe = write_recipe(base, files=(gemma_gguf.name,), name="gemma3-270m")
    result = build(base, recipe=recipe, volume_size=150 * MIB)
    assert len(result.volumes) == 2
    return base / "media"


@pytest.mark.slow
def test_gemma_two_volumes_reverse_order_sigkill_resume_verify_audit(
    gemma_media: Path, tmp_path: Path
) -> None:
    store = trusted_store(tmp_path / "store")
    reverse = sorted(gemma_media.glob("vol-*"), reverse=True)
    # Kill a first import part-way through, as a pulled plug would.
    started = CONTEXT.Event()
    proc = CONTEXT.Process(
        target=run_import_child,
        args=(str(store), [str(v) for v in reverse], 0.02, 8 * MIB, started),
    )
    proc.start()
    assert started.wait(timeout=120)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and check_consistent(store)["done_chunks"] < 10:
        time.sleep(0.1)
    proc.kill()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    check_consistent(store)

    result = import_media(store, reverse, now=NOW)
    assert result.complete and result.already_done_bytes > 0
    assert result.volumes_used == ("vol-001", "vol-002")
    model = get_model(store, "gemma3-270m")
    with open(model.path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == MODEL_SHA256
    assert model.gguf["architecture"] == "gemma3"
    assert verify_store(store).ok

    model.path.chmod(0o644)
    with open(model.path, "r+b") as f:
        f.seek(200 * MIB)
        byte = f.read(1)
        f.seek(200 * MIB)
        f.write(bytes([byte[0] ^ 0x10]))
    report = verify_store(store)
    assert [c.path for c in report.corrupt] == [model.files[0].path]

    assert audit.verify(store) >= 3
    db = sqlite3.connect(store / "index.sqlite", isolation_level=None)
    db.execute("UPDATE audit SET time = '2000-01-01T00:00:00+00:00' WHERE seq = 2")
    db.close()
    with pytest.raises(AuditChainError, match="record 2 was edited"):
        audit.verify(store)
