"""The store's CLI: models list/show/rm, store verify/gc, audit show/verify (exit codes, JSON)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from store_helpers import model_entry, write_model

from appliance.cli.main import main
from appliance.store.store import Store


def payload(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) % 256 for i in range(n))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    a = payload(150_000)
    with Store(store) as s:
        write_model(s, model_entry("gemma", "q4", {"gemma.gguf": a}), {"gemma.gguf": a})
    return store


def run(capsys: pytest.CaptureFixture[str], store: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--store", str(store), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_list_json(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, store_dir, "models", "list", "--json")
    assert code == 0
    (model,) = json.loads(out)
    assert (model["name"], model["version"], model["size"], model["verified"]) == (
        "gemma",
        "q4",
        150_000,
        True,
    )
    code, out, _ = run(capsys, store_dir, "models", "list")
    assert code == 0 and "gemma" in out


def test_models_list_on_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Store(tmp_path / "empty"):
        pass
    code, out, _ = run(capsys, tmp_path / "empty", "models", "list", "--json")
    assert (code, json.loads(out)) == (0, [])


def test_models_show(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, store_dir, "models", "show", "gemma", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["gguf"]["architecture"] == "llama"
    # No installed root names k1: the key is there, its name and words are null.
    assert shown["signers"] == [{"key_id": "k1", "name": None, "words": None}]
    assert shown["files"][0]["blake3"]
    code, out, _ = run(capsys, store_dir, "models", "show", "gemma:q4")
    assert code == 0 and "merkle" in out and "k1" in out and "channel test #1" in out


def test_models_show_unknown_is_exit_3(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, store_dir, "models", "show", "nope")
    assert code == 3 and "ModelNotFoundError" in err


def test_models_rm(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, store_dir, "models", "rm", "gemma")
    assert code == 0 and "removed gemma:q4" in out
    code, out, _ = run(capsys, store_dir, "models", "list", "--json")
    assert json.loads(out) == []
    code, out, _ = run(capsys, store_dir, "audit", "show", "--json")
    assert [r["kind"] for r in json.loads(out)] == ["delete"]


def test_store_verify_catches_a_flipped_byte(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, store_dir, "store", "verify")
    assert code == 0 and "ok" in out
    path = store_dir / "models" / "gemma" / "q4" / "gemma.gguf"
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[100_000] ^= 1
    path.write_bytes(bytes(data))
    code, out, _ = run(capsys, store_dir, "store", "verify", "--json")
    report = json.loads(out)
    assert code == 2 and not report["ok"]
    assert report["corrupt"][0]["offset"] == 65536 * 1
    assert (report["corrupt"][0]["name"], report["corrupt"][0]["version"]) == ("gemma", "q4")
    assert Path(report["corrupt"][0]["quarantined_to"]).exists()
    code, out, _ = run(capsys, store_dir, "models", "list", "--json")
    assert json.loads(out)[0]["verified"] is False


def test_store_gc(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (store_dir / "staging" / "77.part").write_bytes(b"abc")
    code, out, _ = run(capsys, store_dir, "store", "gc", "--json")
    report = json.loads(out)
    assert code == 0 and report["freed_bytes"] == 3
    code, out, _ = run(capsys, store_dir, "store", "gc", "--abandon")
    assert code == 0 and "freed 0 B" in out


def test_audit_verify_catches_an_edited_record(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, store_dir, "models", "rm", "gemma")
    code, out, _ = run(capsys, store_dir, "audit", "verify")
    assert code == 0 and "1 record" in out
    code, out, _ = run(capsys, store_dir, "audit", "show")
    assert code == 0 and "delete" in out
    db = sqlite3.connect(store_dir / "index.sqlite", isolation_level=None)
    db.execute('UPDATE audit SET details = \'{"model":"other"}\' WHERE seq = 1')
    db.close()
    code, _, err = run(capsys, store_dir, "audit", "verify")
    assert code == 2 and "AuditChainError" in err and "record 1 was edited" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "list"],
        ["models", "show"],
        ["models", "rm"],
        ["store", "verify"],
        ["store", "gc"],
        ["audit", "show"],
        ["audit", "verify"],
    ],
)
def test_help_teaches_with_an_example(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "example" in out and "appliance " + argv[0] in out
