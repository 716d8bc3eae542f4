"""``appliance models export``: a verified model into an Ollama store or plain files.

The model that goes back to Ollama is the real chain: an Ollama store made in tmp_path around
the tiny GGUF, built into a signed bundle by an ``ollama:`` recipe, imported into a real store,
exported. The result is read back twice: with our own parser, and by ``ollama_would_load``,
which walks Ollama's read path as its Go code does (there is no ``ollama`` binary here).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from bundle_helpers import NOW, build, tree
from ollama_helpers import PARAMS, TEMPLATE, make_ollama_store, ollama_would_load
from store_helpers import model_entry, small_tmpfs, write_model
from trust_helpers import trusted_store

from appliance.cli.main import main
from appliance.errors import EXIT_REFUSED, EXIT_USAGE, IntegrityError, UsageError
from appliance.format import ollama_layout as ol
from appliance.importer import import_media
from appliance.store import audit
from appliance.store.export import SUMS_NAME, export_dir, export_ollama
from appliance.store.records import find_model
from appliance.store.scrub import verify_store
from appliance.store.store import Store

UPSTREAM = "registry.ollama.ai/library/tiny:latest"


@pytest.fixture()
def upstream(tmp_path: Path, tiny_gguf: Path) -> Path:
    """The Ollama store the model came from; returns its manifest's path."""
    return make_ollama_store(tmp_path / "upstream", tiny_gguf.read_bytes())


@pytest.fixture()
def store(tmp_path: Path, upstream: Path) -> Path:
    """A host's store holding acme/tiny:q4, built from ``ollama: tiny`` and imported."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("channel: site-models\nsequence: 1\nexpires_days: 30\nmodels:\n"
                      "  - name: acme/tiny\n    version: q4\n    license: apache-2.0\n"
                      "    files:\n      - ollama: {model: tiny, store: upstream}\n")
    build(tmp_path, recipe=recipe)
    store_dir = trusted_store(tmp_path / "store")
    import_media(store_dir, [tmp_path / "media"], now=NOW)
    return store_dir


def run(capsys: pytest.CaptureFixture[str], store: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--store", str(store), "models", "export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def tamper(store: Path, ref: str, offset: int = 5000) -> None:
    path = find_model(store, ref).path
    path.chmod(0o644)  # published files are read-only
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def audit_kinds(store: Path) -> list[tuple[str, dict[str, object]]]:
    return [(r.kind, r.details) for r in audit.records(store)]


# --- --ollama ------------------------------------------------------------------------------


def test_an_ollama_model_goes_back_byte_for_byte(tmp_path: Path, store: Path, upstream: Path,
                                                 tiny_gguf: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "site-ollama"
    code, out, _ = run(capsys, store, "acme/tiny", "--ollama", str(target), "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["ok"], result["model"], result["form"], result["ollama_name"]) == (
        True, {"name": "acme/tiny", "version": "q4"}, "ollama", UPSTREAM)
    # The same manifest bytes as upstream, so the same digest Ollama shows as the model ID.
    manifest = target / "manifests/registry.ollama.ai/library/tiny/latest"
    assert manifest.read_bytes() == upstream.read_bytes()
    assert result["manifest_digest"] == ol.digest_of(upstream.read_bytes())
    assert tree(target / "blobs") == tree(tmp_path / "upstream/blobs")
    # Read back by our parser...
    parsed = ol.parse_manifest(manifest.read_bytes())
    blob = target / "blobs" / parsed.model_layer.blob_name
    assert blob.read_bytes() == tiny_gguf.read_bytes()
    # ...and the way Ollama's GetModel reads it.
    loaded = ollama_would_load(target, UPSTREAM)
    assert loaded["template"] == TEMPLATE and loaded["params"] == json.loads(PARAMS)
    assert loaded["model_path"] == blob and loaded["config"]["model_family"] == "llama"
    # Nothing half-written is left: no temporary names in blobs/ or next to the manifest.
    assert not [p for p in target.rglob("*") if p.name.startswith(".")]
    (details,) = [d for k, d in audit_kinds(store) if k == "export"]
    assert details["model"] == "acme/tiny:q4" and details["ollama_name"] == UPSTREAM


def test_a_model_from_elsewhere_gets_a_config_from_its_gguf(tmp_path: Path, tiny_gguf: Path
                                                            ) -> None:
    store_dir = tmp_path / "store"
    data = tiny_gguf.read_bytes()
    with Store(store_dir) as s:
        write_model(s, model_entry("acme/tiny", "1", {"tiny.gguf": data, "notes.txt": b"n"}),
                    {"tiny.gguf": data, "notes.txt": b"n"})
    ticks: list[tuple[int, int]] = []
    result = export_ollama(store_dir, "acme/tiny", tmp_path / "o",
                           progress=lambda done, total: ticks.append((done, total)))
    assert result.ollama_name == "registry.ollama.ai/acme/tiny:1"
    assert result.left_out == ("notes.txt",)
    assert ticks[-1] == (len(data), len(data))
    loaded = ollama_would_load(tmp_path / "o", "registry.ollama.ai/acme/tiny:1")
    assert loaded["config"] == {"model_format": "gguf", "model_family": "llama",
                                "model_families": ["llama"], "model_type": "1",
                                "file_type": "F32", "architecture": "amd64", "os": "linux"}
    assert "template" not in loaded  # Ollama falls back on the GGUF's chat template
    again = export_ollama(store_dir, "acme/tiny", tmp_path / "o")
    assert again.unchanged and again.manifest_digest == result.manifest_digest


def test_another_model_under_a_taken_name_needs_replace(tmp_path: Path, store: Path,
                                                        tiny_gguf: Path) -> None:
    target = tmp_path / "o"
    make_ollama_store(target, tiny_gguf.read_bytes()[:-64] + b"\0" * 64, template=None)
    taken = (target / "manifests/registry.ollama.ai/library/tiny/latest").read_bytes()
    with pytest.raises(UsageError, match="different model named tiny:latest"):
        export_ollama(store, "acme/tiny", target)
    assert (target / "manifests/registry.ollama.ai/library/tiny/latest").read_bytes() == taken
    export_ollama(store, "acme/tiny", target, name="tiny:site")  # another name is fine
    ollama_would_load(target, "registry.ollama.ai/library/tiny:site")
    result = export_ollama(store, "acme/tiny", target, replace=True)
    assert not result.unchanged
    assert ollama_would_load(target, UPSTREAM)["template"] == TEMPLATE


def test_a_tampered_model_is_refused_and_nothing_reaches_ollama(
        tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tamper(store, "acme/tiny")
    target = tmp_path / "o"
    code, _, err = run(capsys, store, "acme/tiny", "--ollama", str(target))
    assert code == EXIT_REFUSED and "IntegrityError" in err
    assert not (target / "manifests").exists()
    assert [p.name for p in (target / "blobs").iterdir()] == []  # the partial copy is gone
    with pytest.raises(IntegrityError) as raised:
        export_ollama(store, "acme/tiny", target)
    assert type(raised.value) is IntegrityError and raised.value.chunk is not None
    refusals = [d for k, d in audit_kinds(store) if k == "refusal"]
    assert refusals and refusals[-1]["action"] == "export"
    assert refusals[-1]["error"] == "IntegrityError"


def test_a_crash_mid_copy_leaves_no_manifest(tmp_path: Path, store: Path) -> None:
    class Crash(BaseException):
        pass

    def crash(done: int, total: int) -> None:
        if done > total // 2:  # inside the GGUF, after the sidecar
            raise Crash

    with pytest.raises(Crash):
        export_ollama(store, "acme/tiny", tmp_path / "o", progress=crash)
    assert not (tmp_path / "o/manifests").exists()
    assert list((tmp_path / "o/blobs").iterdir()) == []


# --- --dir ---------------------------------------------------------------------------------


def test_dir_export_checks_with_sha256sum(tmp_path: Path, store: Path, tiny_gguf: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "share" / "tiny"
    out_dir.parent.mkdir()
    code, out, _ = run(capsys, store, "acme/tiny:q4", "--dir", str(out_dir), "--json")
    assert code == 0
    result = json.loads(out)
    assert sorted(f["path"] for f in result["files"]) == ["tiny-latest.gguf",
                                                          "tiny-latest.ollama.json"]
    assert (out_dir / "tiny-latest.gguf").read_bytes() == tiny_gguf.read_bytes()
    check = subprocess.run(["sha256sum", "--strict", "-c", SUMS_NAME], cwd=out_dir,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 2
    assert os.listdir(out_dir.parent) == ["tiny"]  # the assembly directory is gone
    # A changed byte is what sha256sum -c is for.
    (out_dir / "tiny-latest.gguf").write_bytes(b"x" + tiny_gguf.read_bytes()[1:])
    assert subprocess.run(["sha256sum", "-c", SUMS_NAME], cwd=out_dir, capture_output=True,
                          check=False).returncode == 1
    assert [d["form"] for k, d in audit_kinds(store) if k == "export"] == ["dir"]


def test_dir_export_never_mixes_with_other_files(tmp_path: Path, store: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    code, _, err = run(capsys, store, "acme/tiny", "--dir", str(busy))
    assert code == EXIT_USAGE and "not an empty directory" in err
    assert os.listdir(busy) == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_dir(store, "acme/tiny", empty)
    assert sorted(os.listdir(empty)) == [SUMS_NAME, "tiny-latest.gguf",
                                         "tiny-latest.ollama.json"]


def test_dir_export_of_a_tampered_model_writes_nothing(tmp_path: Path, store: Path) -> None:
    tamper(store, "acme/tiny", offset=10)
    with pytest.raises(IntegrityError):
        export_dir(store, "acme/tiny", tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".appliance-export")]
    assert not (tmp_path / "out").exists()


def test_export_needs_exactly_one_target(tmp_path: Path, store: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--store", str(store), "models", "export", "acme/tiny"])
    code, _, err = run(capsys, store, "acme/tiny", "--dir", str(tmp_path / "d"), "--replace")
    assert code == EXIT_USAGE and "--replace" in err


def test_a_quarantined_model_is_refused_before_anything_is_read(tmp_path: Path,
                                                                store: Path) -> None:
    tamper(store, "acme/tiny")
    assert not verify_store(store).ok  # moves the file to quarantine/
    for export in (lambda: export_ollama(store, "acme/tiny", tmp_path / "o"),
                   lambda: export_dir(store, "acme/tiny", tmp_path / "d")):
        with pytest.raises(IntegrityError, match="must not be exported"):
            export()
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_dir_export_onto_a_mount_point(tmp_path: Path, store: Path) -> None:
    """An operator's USB disk: an empty mount point, another file system than its parent,
    so the export cannot be renamed onto it and is assembled inside it instead."""
    try:
        with small_tmpfs(tmp_path / "usb", 8) as usb:
            export_dir(store, "acme/tiny", usb)
            assert sorted(os.listdir(usb)) == [SUMS_NAME, "tiny-latest.gguf",
                                               "tiny-latest.ollama.json"]
            assert subprocess.run(["sha256sum", "-c", SUMS_NAME], cwd=usb,
                                  capture_output=True, check=False).returncode == 0
    except OSError as e:
        if "cannot mount" not in str(e):
            raise
        pytest.skip(str(e))
