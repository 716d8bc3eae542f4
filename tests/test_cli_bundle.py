"""``appliance bundle ...`` end to end with real key files and trust roots made by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_helpers import flip_byte, make_sources, write_recipe

from appliance.bundle.media import parse_index
from appliance.cli.main import main
from appliance.errors import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_USAGE


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """Keys (root, two publishers), a root v1 with publisher threshold 1, source files."""
    keys = tmp_path / "keys"
    for name in ("root", "pub-a", "pub-b"):
        assert run(capsys, "keys", "generate", name, "--out", keys, "--unencrypted")[0] == 0
    code, _, err = run(capsys, "trust", "init", "--root-key", keys / "root.pub",
                       "--root-threshold", "1", "--publisher-key", keys / "pub-a.pub",
                       keys / "pub-b.pub", "--publisher-threshold", "1", "--sign-with",
                       keys / "root.key", "--out", tmp_path / "root-1.yaml")
    assert code == 0, err
    make_sources(tmp_path, random_mib=30)
    write_recipe(tmp_path)
    return tmp_path


def _build(capsys: pytest.CaptureFixture[str], site: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "bundle", "build", site / "recipe.yaml", "--key", site / "keys/pub-a.key",
               "--trust", site / "root-1.yaml", "--out", site / "media", *extra)


def test_build_inspect_verify(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _build(capsys, site)
    assert code == EXIT_OK, err
    assert "built bundle site-models #1" in out and "signed by" in out

    code, out, _ = run(capsys, "bundle", "inspect", site / "media")
    assert code == EXIT_OK
    assert "UNVERIFIED" in out and "acme/tiny q4_k_m" in out and "pub-a [" in out

    code, out, _ = run(capsys, "bundle", "inspect", site / "media", "--json",
                       "--trust", site / "root-1.yaml")
    info = json.loads(out)
    assert info["verified"] and info["channel"] == "site-models" and info["sequence"] == 1
    assert info["models"][0]["size"] == 30 * 2**20 + 600000
    assert info["signers"][0]["name"] == "pub-a" and info["carried_roots"] == [1]

    code, out, err = run(capsys, "bundle", "verify", site / "media", "--trust",
                         site / "root-1.yaml")
    assert code == EXIT_OK, err
    assert "signatures OK" in out and "volumes present: vol-001" in out


def test_verify_uses_the_installed_root(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _build(capsys, site)[0] == EXIT_OK
    store = site / "store"
    code, _, err = run(capsys, "bundle", "verify", site / "media", "--store", store)
    assert code == EXIT_USAGE and "StoreNotFoundError" in err and "trust install" in err
    assert not store.exists()  # a read-only command creates no store
    fingerprint = run(capsys, "trust", "fingerprint", site / "root-1.yaml")[1].strip()
    assert run(capsys, "trust", "install", site / "root-1.yaml", "--fingerprint", fingerprint,
               "--store", store)[0] == EXIT_OK
    code, out, err = run(capsys, "bundle", "verify", site / "media", "--store", store,
                         "--json")
    assert code == EXIT_OK, err
    report = json.loads(out)
    assert report["ok"] and report["volumes_missing"] == [] and report["chunks_verified"] > 3


def test_volumes_missing_partial_and_tampered(site: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _build(capsys, site, "--volume-size", "20M", "--pack-size", "8MiB")
    assert code == EXIT_OK, err
    vol2 = site / "media" / "vol-002"
    code, out, err = run(capsys, "bundle", "verify", vol2, "--trust", site / "root-1.yaml")
    assert code == EXIT_ERROR and "MissingVolumeError" in err
    assert "volumes missing: vol-001, vol-003" in out
    code, _, _ = run(capsys, "bundle", "verify", vol2, "--trust", site / "root-1.yaml",
                     "--allow-partial")
    assert code == EXIT_OK

    entry = parse_index((vol2 / "index.bin").read_bytes()).entries[1]
    flip_byte(vol2 / "packs" / f"pack-{entry.pack:04d}.zst", entry.offset + 10)
    code, _, err = run(capsys, "bundle", "verify", site / "media", "--trust",
                       site / "root-1.yaml")
    assert code == EXIT_REFUSED
    assert "IntegrityError" in err and entry.digest.hex() in err and "vol-002" in err
    assert f"offset {entry.offset}" in err and "acme/tiny/weights.bin" in err


def test_cosign_with_the_sign_command(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _build(capsys, site)[0] == EXIT_OK
    code, out, _ = run(capsys, "bundle", "sign", site / "media", "--key",
                       site / "keys/pub-b.key")
    assert code == EXIT_OK and "signed" in out
    info = json.loads(run(capsys, "bundle", "inspect", site / "media", "--json")[1])
    assert sorted(s["name"] for s in info["signers"]) == ["pub-a", "pub-b"]


def test_usage_errors(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _build(capsys, site, "--volume-size", "lots")
    assert code == EXIT_USAGE and "not a size" in err
    code, _, err = run(capsys, "bundle", "build", site / "nope.yaml", "--key",
                       site / "keys/pub-a.key", "--out", site / "media")
    assert code == EXIT_USAGE
    code, _, _ = run(capsys, "bundle", "verify", site / "nowhere", "--trust",
                     site / "root-1.yaml")
    assert code == EXIT_USAGE
    code, _, err = run(capsys, "bundle", "build", site / "recipe.yaml", "--key",
                       site / "keys/pub-a.pub", "--out", site / "media")
    assert code == EXIT_ERROR and "KeyFileError" in err
    assert not (site / "media").exists()


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("build", "sign", "verify", "inspect"):
        with pytest.raises(SystemExit):
            main(["bundle", command, "--help"])
        out = capsys.readouterr().out
        assert "example" in out and f"appliance bundle {command}" in out
