"""A read-only store: the read-only commands work on it, every writer is told why it cannot.

The store is made read-only for real: as root (where ``chmod`` stops nothing) through a
read-only bind mount of a populated store, otherwise with ``chmod -R a-w``.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_helpers import NOW, build, make_sources
from importer_helpers import tree_digest
from trust_helpers import trusted_store

from appliance.cli.main import main
from appliance.errors import EXIT_ERROR, StoreError
from appliance.importer import import_media
from appliance.store import audit, layout
from appliance.store.records import list_models
from appliance.store.scrub import verify_store


def _read_only_view(store: Path, view: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
        for p in modes:
            p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
        try:
            yield store
        finally:
            for p, mode in modes.items():
                p.chmod(stat.S_IMODE(mode))
        return
    view.mkdir()
    for argv in (["mount", "--bind", str(store), str(view)],
                 ["mount", "-o", "remount,bind,ro", str(view)]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)
            pytest.skip(f"running as root and cannot make a read-only bind mount "
                        f"({' '.join(argv[:3])}: {done.stderr.strip()}); chmod would not "
                        "stop root from writing")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ro")
    make_sources(base, random_mib=1)
    build(base)
    store = trusted_store(base / "store")
    import_media(store, [base / "media"], now=NOW)
    return store, base / "media"


@pytest.fixture
def read_only(populated: tuple[Path, Path], tmp_path: Path) -> Iterator[Path]:
    store, _ = populated
    yield from _read_only_view(store, tmp_path / "view")


def test_read_only_commands_work(read_only: Path, populated: tuple[Path, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(populated[0])
    assert layout.read_only_reason(read_only) is not None
    assert [f"{m.name}:{m.version}" for m in list_models(read_only)] == ["acme/tiny:q4_k_m"]
    assert audit.verify(read_only) == len(list(audit.records(populated[0])))
    report = verify_store(read_only)
    assert report.ok and report.files_checked == 2
    for argv in (["models", "list"], ["audit", "verify"], ["store", "verify"]):
        assert main([*argv, "--store", str(read_only)]) == 0, capsys.readouterr().err
    assert "acme/tiny" in capsys.readouterr().out
    assert tree_digest(populated[0]) == before  # nothing written, not even verified_at


def test_writers_get_a_store_error_that_says_read_only(
        read_only: Path, populated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(StoreError, match="is read-only") as info:
        import_media(read_only, [populated[1]], now=NOW)
    assert type(info.value) is StoreError
    assert "import needs to write" in str(info.value)
    for argv in (["import", str(populated[1])], ["models", "rm", "acme/tiny:q4_k_m"],
                 ["store", "gc"]):
        assert main([*argv, "--store", str(read_only)]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert "StoreError" in err and "read-only" in err, err
    assert [m.name for m in list_models(read_only)] == ["acme/tiny"]


def test_a_writable_store_is_not_read_only(tmp_path: Path) -> None:
    assert layout.read_only_reason(tmp_path) is None
    assert layout.read_only_reason(tmp_path / "not-yet") is None


