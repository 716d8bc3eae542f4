"""``torrent make`` from bundle media before import, seeding a model still importing, and a
fetch that writes straight into staging (appliance.torrent.make, .storage, .fetch)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import libtorrent as lt
import pytest
from bundle_helpers import MIB, build, flip_byte, make_sources
from trust_helpers import NOW, make_root, trusted_store

from appliance.bundle.reader import find_volume_dirs
from appliance.cli.main import main
from appliance.errors import (
    IntegrityError,
    MissingVolumeError,
    ModelNotFoundError,
    RotationError,
)
from appliance.importer import import_media
from appliance.limits import MAX_CHUNK_BYTES
from appliance.store import trust_state
from appliance.torrent import meta
from appliance.torrent.make import media_torrent, model_torrent

MEDIA_MODEL = "acme/tiny"


def _media(base: Path, random_mib: int = 1, **kwargs: object) -> Path:
    make_sources(base, random_mib=random_mib)
    build(base, **kwargs)
    return base / "media"


def test_make_from_media_is_the_torrent_of_the_imported_model(tmp_path: Path) -> None:
    media = _media(tmp_path / "bundle")
    store = trusted_store(tmp_path / "store")
    from_media, ref = media_torrent(store, [media], MEDIA_MODEL, root_cert=None, now=NOW)
    again, _ = media_torrent(store, [media], f"{MEDIA_MODEL}:q4_k_m", root_cert=None, now=NOW)
    assert ref == f"{MEDIA_MODEL}:q4_k_m" and from_media == again
    assert not list((store / "torrent-scratch").iterdir())  # the plain copy is gone
    import_media(store, [media], now=NOW)
    from_store, _ = model_torrent(store, MEDIA_MODEL, root_cert=None)
    assert from_media == from_store
    carried = meta.decode(lt.torrent_info(from_media).info_section())
    assert carried.manifest == (find_volume_dirs([media])[0] / "manifest.yaml").read_bytes()
    assert [s.to_bytes() for s in carried.chain] == [
        s.to_bytes() for s in trust_state.installed_chain(store)]


def test_make_from_media_carries_the_newer_root_an_import_would_install(tmp_path: Path) -> None:
    v1 = make_root()
    v2 = make_root(version=2)  # the same root keys sign it: a valid rotation
    media = _media(tmp_path / "bundle", chain=[v1, v2])
    store = trusted_store(tmp_path / "store", v1)
    from_media, _ = media_torrent(store, [media], MEDIA_MODEL, root_cert=None, now=NOW)
    carried = meta.decode(lt.torrent_info(from_media).info_section())
    assert [s.root.version for s in carried.chain] == [1, 2]
    assert [s.root.version for s in trust_state.installed_chain(store)] == [1]  # not installed
    import_media(store, [media], now=NOW)
    assert model_torrent(store, MEDIA_MODEL, root_cert=None)[0] == from_media


def test_make_from_media_refuses_a_damaged_chunk_and_an_untrusted_bundle(tmp_path: Path) -> None:
    media = _media(tmp_path / "bundle")
    stranger = tmp_path / "stranger"
    other = make_root(root_keys=("r7", "r8", "r9"), sign_with=("r7", "r8"),
                      publishers={"p9": ("*",)})
    trust_state.install_first_root(stranger, other.to_bytes(), other.root.fingerprint, NOW)
    with pytest.raises(RotationError):  # the media's v1 is not this host's v1
        media_torrent(stranger, [media], MEDIA_MODEL, root_cert=None, now=NOW)
    (pack,) = (find_volume_dirs([media])[0] / "packs").iterdir()
    flip_byte(pack, 100)
    store = trusted_store(tmp_path / "store")
    with pytest.raises(IntegrityError):
        media_torrent(store, [media], MEDIA_MODEL, root_cert=None, now=NOW)
    assert not list((store / "torrent-scratch").iterdir())


def test_make_from_media_needs_the_volumes_holding_the_model(tmp_path: Path) -> None:
    media = _media(tmp_path / "bundle", random_mib=20, volume_size=12 * MIB,
                   pack_size=MAX_CHUNK_BYTES)
    volumes = find_volume_dirs([media])
    assert len(volumes) >= 2
    store = trusted_store(tmp_path / "store")
    with pytest.raises(MissingVolumeError):
        media_torrent(store, volumes[:1], MEDIA_MODEL, root_cert=None, now=NOW)
    whole, _ = media_torrent(store, volumes, MEDIA_MODEL, root_cert=None, now=NOW)
    import_media(store, volumes, now=NOW)
    assert model_torrent(store, MEDIA_MODEL, root_cert=None)[0] == whole


def test_make_from_media_through_the_cli(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    media = _media(tmp_path / "bundle", now=datetime.now(UTC))
    store = trusted_store(tmp_path / "store")
    out = tmp_path / "tiny.torrent"
    assert main(["--store", str(store), "torrent", "make", MEDIA_MODEL, "--media", str(media),
                 "--insecure", "-o", str(out)]) == 0
    assert f"{out}: {MEDIA_MODEL}:q4_k_m, PLAINTEXT (--insecure)" in capsys.readouterr().out
    assert main(["--store", str(store), "import", str(media)]) == 0
    assert out.read_bytes() == model_torrent(store, MEDIA_MODEL, root_cert=None)[0]
    assert main(["--store", str(store), "torrent", "make", "acme/other", "--media", str(media),
                 "--insecure", "-o", str(out)]) == ModelNotFoundError.exit_code
