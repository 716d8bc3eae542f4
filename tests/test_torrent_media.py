"""``torrent make`` from bundle media before import, seeding a model still importing, and a
fetch that writes straight into staging (appliance.torrent.make, .storage, .fetch)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import libtorrent as lt
import pytest
from bundle_helpers import CHUNK, MIB, Bundle, build, flip_byte, make_sources
from peer_helpers import seed
from torrent_helpers import (
    LOOPBACK,
    MODEL,
    LyingPeer,
    fetch_from,
    held,
    seeded_host,
    two_file_bundle,
)
from trust_helpers import NOW, make_root, trusted_store

from appliance.bundle.reader import find_volume_dirs
from appliance.cli.main import main
from appliance.errors import (
    EXIT_REFUSED,
    IntegrityError,
    MissingVolumeError,
    ModelNotFoundError,
    PeerError,
    RotationError,
)
from appliance.importer import import_media
from appliance.limits import MAX_CHUNK_BYTES
from appliance.store import layout, trust_state
from appliance.store.records import find_model
from appliance.store.scrub import verify_store
from appliance.torrent import meta
from appliance.torrent.make import media_torrent, model_torrent
from appliance.torrent.partial import StagedSeeds
from appliance.torrent.seed import Seeder

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


# -- a model still importing, seeded; a fetch that writes into staging -----------------------

def _partial_seeder(tmp_path: Path, bundle: Bundle, chunks: int) -> Path:
    """A store holding the first ``chunks`` chunks of the bundle's model, still importing."""
    store = trusted_store(tmp_path / "importing")
    seed(store, bundle, partial_chunks=chunks)
    assert find_model(store, MODEL, include_importing=True).state == "importing"
    return store


def _allocated_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (symbolic links not followed)."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow  # real libtorrent swarms, waits for a stalled fetch
def test_an_importing_model_seeds_its_verified_pieces_and_the_fetch_writes_into_staging(
        tmp_path: Path) -> None:
    bundle = two_file_bundle(3_000_000)
    data, _ = model_torrent(seeded_host(tmp_path / "full", bundle), MODEL, root_cert=None)
    importing = _partial_seeder(tmp_path, bundle, 60)
    store = trusted_store(tmp_path / "fetcher")
    with Seeder(importing, LOOPBACK, identity=None) as seeder:
        staged = StagedSeeds(seeder)
        seeded = staged.add(data)
        assert seeded.infohash == meta.infohash(lt.torrent_info(data))
        offered = staged.staged[0].held
        assert 0 < offered < lt.torrent_info(data).num_pieces()
        with pytest.raises(PeerError, match="no torrent peer delivered"):
            fetch_from(store, data, [seeder], wait=3.0)
    # Exactly the chunks whose every piece the importing host offered, and nothing else:
    # libtorrent wrote them into the fetcher's staged files, not into a copy of its own.
    assert 40 <= held(store) <= 60
    scratch = store / "torrent-scratch"
    assert _allocated_files(scratch) == []
    (link,) = [p for p in scratch.rglob("weights.bin")]
    assert link.is_symlink() and link.resolve().parent == layout.staging_dir(store)
    # The seeder's staged file was only read.
    assert find_model(importing, MODEL, include_importing=True).state == "importing"
    with Seeder(seeded_host(tmp_path / "seed", bundle), LOOPBACK, identity=None) as full:
        full.add_published()
        result = fetch_from(store, data, [full])
    assert result.complete and result.already_done_bytes > 0 and verify_store(store).ok
    assert not (scratch / result.infohash).exists()


@pytest.mark.slow  # real libtorrent swarms, waits for a stalled fetch
def test_seeding_an_importing_model_refreshes_as_its_import_goes_on(tmp_path: Path) -> None:
    bundle = two_file_bundle(3_000_000)
    data, _ = model_torrent(seeded_host(tmp_path / "full", bundle), MODEL, root_cert=None)
    importing = _partial_seeder(tmp_path, bundle, 20)
    with Seeder(importing, LOOPBACK, identity=None) as seeder:
        staged = StagedSeeds(seeder, refresh_s=0.0)
        staged.add(data)
        before = staged.staged[0].held
        seed(importing, bundle, partial_chunks=100)  # the import goes on
        staged.refresh()
        assert staged.staged[0].held > before
        seed(importing, bundle)  # and finishes: seeded from the published files now
        staged.refresh(force=True)
        assert staged.staged == [] and [s.model for s in seeder.seeded] == [f"{MODEL}:1"]
        store = trusted_store(tmp_path / "fetcher")
        result = fetch_from(store, data, [seeder])
    assert result.complete and verify_store(store).ok


def test_seeding_refuses_a_torrent_of_another_manifest(tmp_path: Path) -> None:
    other = two_file_bundle(3_000_000, seed_value=2)
    data, _ = model_torrent(seeded_host(tmp_path / "other", other), MODEL, root_cert=None)
    importing = _partial_seeder(tmp_path, two_file_bundle(3_000_000), 20)
    with Seeder(importing, LOOPBACK, identity=None) as seeder:
        with pytest.raises(IntegrityError, match="another manifest"):
            StagedSeeds(seeder).add(data)
        assert seeder.seeded == []
    torrent = tmp_path / "other.torrent"
    torrent.write_bytes(data)
    assert main(["--store", str(importing), "torrent", "seed", "--torrent", str(torrent),
                 "--insecure", "--no-lsd", "--listen", "127.0.0.1:0"]) == EXIT_REFUSED


@pytest.mark.slow  # real libtorrent swarms, waits for a stalled fetch
def test_done_chunks_a_lying_peer_overwrote_are_written_back(tmp_path: Path) -> None:
    """Chunks are 16 KiB and pieces 32 KiB: with an odd number of chunks done, a needed chunk
    shares its piece with a done one. The lying peer's garbage for that piece must not stay
    in the done chunk, whose bytes the store has already verified."""
    bundle = two_file_bundle(3_000_000)
    data, _ = model_torrent(seeded_host(tmp_path / "full", bundle), MODEL, root_cert=None)
    store = trusted_store(tmp_path / "fetcher")
    seed(store, bundle, partial_chunks=5)
    assert lt.torrent_info(data).piece_length() == 2 * CHUNK
    with LyingPeer(lt.torrent_info(data)) as liar:
        with pytest.raises(PeerError):
            fetch_from(store, data, [liar], wait=4.0)
        assert liar.blocks_sent > 0
    weights = bundle.contents[MODEL]["weights.bin"]
    (staged,) = [p for p in layout.staging_dir(store).iterdir()
                 if p.stat().st_size == len(weights)]
    assert staged.read_bytes()[:5 * CHUNK] == weights[:5 * CHUNK]
    assert held(store) == 5 and not list((store / "torrent-scratch").rglob("guard/*"))


@pytest.mark.slow  # real libtorrent swarms, waits for a stalled fetch
def test_a_fetch_killed_with_chunks_kept_aside_writes_them_back_first(tmp_path: Path) -> None:
    """What a SIGKILL leaves when it lands while a bad peer's blocks sit in a done chunk:
    the kept copy in guard/ and the damaged bytes. The next fetch writes the copy back before
    anything else, so the model it publishes verifies."""
    bundle = two_file_bundle(3_000_000)
    seed_store = seeded_host(tmp_path / "full", bundle)
    data, _ = model_torrent(seed_store, MODEL, root_cert=None)
    store = trusted_store(tmp_path / "fetcher")
    seed(store, bundle, partial_chunks=5)
    weights = bundle.contents[MODEL]["weights.bin"]
    (staged,) = [p for p in layout.staging_dir(store).iterdir()
                 if p.stat().st_size == len(weights)]
    model = bundle.manifest.models[0]
    chunk = next(f for f in model.files if f.path == "weights.bin").chunks[4]
    guard = store / "torrent-scratch" / meta.infohash(lt.torrent_info(data)) / "guard"
    guard.mkdir(parents=True)
    (guard / chunk.digest).write_bytes(weights[chunk.offset:chunk.offset + chunk.length])
    flip_byte(staged, chunk.offset + 100)
    notes: list[str] = []
    with Seeder(seed_store, LOOPBACK, identity=None) as seeder:
        seeder.add_published()
        result = fetch_from(store, data, [seeder], notes=notes)
    assert "wrote back the chunks a killed fetch had kept aside" in notes
    assert result.complete and verify_store(store).ok
