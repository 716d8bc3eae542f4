"""``appliance import`` end to end through the CLI (real clock, real bundle, real store)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bundle_helpers import build, make_sources, write_recipe
from importer_helpers import tree_digest
from trust_helpers import make_root

from appliance.cli.main import main
from appliance.format.trust import SignedRoot
from appliance.store import trust_state

MIB = 1 << 20


@pytest.fixture(scope="module")
def signed_root() -> SignedRoot:
    now = datetime.now(UTC).replace(microsecond=0)
    return make_root(created=now - timedelta(days=1), expires=now + timedelta(days=100))


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, signed_root: SignedRoot) -> Path:
    base = tmp_path_factory.mktemp("cli-bundle")
    make_sources(base, random_mib=9)
    # The real clock: the CLI checks expiry against it.
    build(base, recipe=write_recipe(base, expires_days=10), root=signed_root, now=None,
          volume_size=12 * MIB)
    return base / "media"


@pytest.fixture
def store(tmp_path: Path, signed_root: SignedRoot) -> Path:
    store = tmp_path / "store"
    trust_state.install_first_root(
        store, signed_root.to_bytes(), signed_root.root.fingerprint, datetime.now(UTC)
    )
    return store


def run(capsys: pytest.CaptureFixture[str], store: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--store", str(store), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_import_one_volume_then_the_other(
    media: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volumes = sorted(media.glob("vol-*"))
    assert len(volumes) == 2
    before = tree_digest(media)
    code, out, err = run(capsys, store, "import", str(volumes[1]))
    assert code == 3 and "MissingVolumeError" in err and "vol-001" in err
    assert "incomplete" in out
    code, out, _ = run(capsys, store, "models", "list", "--json")
    assert json.loads(out) == []
    code, out, err = run(capsys, store, "import", str(volumes[0]), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] and result["published"] == [{"name": "acme/tiny", "version": "q4_k_m"}]
    code, out, _ = run(capsys, store, "models", "list", "--json")
    assert [m["verified"] for m in json.loads(out)] == [True]
    assert tree_digest(media) == before
    code, out, _ = run(capsys, store, "audit", "show", "--json")
    assert [r["kind"] for r in json.loads(out)] == ["trust-install", "import", "import"]


def test_import_refusal_is_exit_2(
    media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_root(root_keys=("x1", "x2"), sign_with=("x1", "x2"), publishers={"q1": ("*",)})
    store = tmp_path / "other-store"
    trust_state.install_first_root(
        store, other.to_bytes(), other.root.fingerprint, datetime.now(UTC)
    )
    code, _, err = run(capsys, store, "import", str(media))
    assert code == 2 and "RotationError" in err  # the carried chain is not ours


def test_reason_without_allow_expired_is_a_usage_error(
    media: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, store, "import", str(media), "--reason", "x")
    assert code == 1 and "--allow-expired" in err


def test_missing_media_dir_is_a_usage_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, store, "import", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in err
