"""Torrent make/seed/fetch with real libtorrent sessions on loopback (appliance.torrent)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest
from bundle_helpers import make_bundle, model_bytes
from peer_helpers import published_bytes
from torrent_helpers import (
    LOOPBACK,
    MODEL,
    LyingPeer,
    fetch_from,
    held,
    member,
    seeded_host,
    two_file_bundle,
)
from trust_helpers import NOW, make_root, trusted_store

from appliance.errors import (
    IntegrityError,
    ModelNotFoundError,
    PeerError,
    ThresholdError,
    UsageError,
)
from appliance.format.manifest import parse_manifest
from appliance.peer import tls
from appliance.store import audit, layout, trust_state
from appliance.store.records import find_model, list_models
from appliance.store.scrub import verify_store
from appliance.torrent import meta
from appliance.torrent.certs import TorrentIdentity, load_torrent_identity
from appliance.torrent.make import build_torrent, model_torrent
from appliance.torrent.seed import Seeder


def _decoded(data: bytes) -> Any:
    return lt.bdecode(data)


def _carried(store: Path) -> tuple[meta.Carried, dict[bytes, object]]:
    data, _ = model_torrent(store, MODEL, root_cert=None)
    info = _decoded(data)[b"info"]
    return meta.decode(lt.bencode(info)), info[meta.KEY]


def test_make_is_deterministic_v2_and_lists_the_signed_files(tmp_path: Path) -> None:
    bundle = two_file_bundle()
    store = seeded_host(tmp_path / "a", bundle)
    first, ref = model_torrent(store, MODEL, root_cert=None)
    again, _ = model_torrent(store, MODEL, root_cert=None)
    # A second store holding the same model and root makes the very same torrent.
    other, _ = model_torrent(seeded_host(tmp_path / "b", bundle), MODEL, root_cert=None)
    assert ref == f"{MODEL}:1" and first == again == other
    decoded = _decoded(first)
    assert set(decoded) == {b"info", b"piece layers"}  # no creation date, no creator
    info = decoded[b"info"]
    assert info[b"meta version"] == 2 and b"pieces" not in info  # v2 only
    ti = lt.torrent_info(first)
    model = bundle.manifest.models[0]
    assert meta.listed_files(ti) == meta.torrent_files(model) == sorted(
        [("org~tiny/1/weights.bin", 300_000), ("org~tiny/1/notes/readme.txt", 29 * 40)])
    carried = meta.decode(ti.info_section())
    assert carried.manifest == bundle.body and (carried.name, carried.version) == (MODEL, "1")
    assert parse_manifest(carried.manifest).models[0] == model
    assert set(carried.signatures) == set(bundle.signatures)


def test_fetch_from_a_seeder_publishes_a_verified_model(tmp_path: Path) -> None:
    bundle = two_file_bundle()
    seed_store = seeded_host(tmp_path / "seed", bundle)
    before = {p: p.read_bytes() for p in layout.models_dir(seed_store).rglob("*") if p.is_file()}
    data, _ = model_torrent(seed_store, MODEL, root_cert=None)
    with Seeder(seed_store, LOOPBACK, identity=None) as seeder:
        seeder.add_published()
        store = trusted_store(tmp_path / "fetcher")
        result = fetch_from(store, data, [seeder])
        again = fetch_from(store, data, [seeder])
    assert result.complete and not result.present
    assert result.bytes_fetched == bundle.size and result.hash_failures == 0
    assert again.present and again.bytes_fetched == 0
    for path, contents in bundle.contents[MODEL].items():
        assert published_bytes(store, MODEL, path) == contents
    report = verify_store(store)
    assert report.ok and report.files_checked == 2
    assert not (store / "torrent-scratch" / result.infohash).exists()
    # The seeder's published files were only read.
    assert {p: p.read_bytes() for p in before} == before
    kinds = [r.kind for r in audit.records(store)]
    assert kinds.count("torrent") == 2


def test_torrent_whose_bytes_differ_from_the_manifest_is_refused(tmp_path: Path) -> None:
    """A seeder whose torrent hashes other bytes (libtorrent is satisfied) lands nothing:
    the sink's check against the signed manifest refuses the first bad chunk."""
    bundle = two_file_bundle()
    honest = seeded_host(tmp_path / "honest", bundle)
    _, carried = _carried(honest)
    model = bundle.manifest.models[0]
    lying = tmp_path / "lying"
    for path, contents in bundle.contents[MODEL].items():
        target = lying / "org~tiny" / "1" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        bad = bytearray(contents)
        bad[len(bad) // 2] ^= 0x01
        target.write_bytes(bytes(bad))
    data = build_torrent(lying, model, carried, root_cert=None)
    with Seeder(honest, LOOPBACK, identity=None) as seeder:
        seeder.add(data, f"{MODEL}:1", lying)
        store = trusted_store(tmp_path / "fetcher")
        with pytest.raises(IntegrityError):
            fetch_from(store, data, [seeder])
    with pytest.raises(ModelNotFoundError):
        find_model(store, MODEL, include_importing=False)
    refusals = [r for r in audit.records(store) if r.kind == "refusal"]
    assert refusals and refusals[-1].details["error"] == "IntegrityError"


def test_torrent_listing_other_files_than_the_manifest_is_refused_before_download(
        tmp_path: Path) -> None:
    bundle = two_file_bundle()
    honest = seeded_host(tmp_path / "honest", bundle)
    _, carried = _carried(honest)
    model = bundle.manifest.models[0]
    fewer = replace(model, files=model.files[:1])  # one signed file left out
    data = build_torrent(layout.models_dir(honest), fewer, carried, root_cert=None)
    store = trusted_store(tmp_path / "fetcher")
    with pytest.raises(IntegrityError, match="do not match signed model"):
        fetch_from(store, data, [], wait=30.0)  # no seeder: refused before asking anyone
    assert not (store / "torrent-scratch").exists()
    assert list_models(store, include_importing=True) == []


def test_manifest_this_host_does_not_trust_is_refused(tmp_path: Path) -> None:
    bundle = two_file_bundle()
    data, _ = model_torrent(seeded_host(tmp_path / "seed", bundle), MODEL, root_cert=None)
    stranger = tmp_path / "stranger"
    other = make_root(root_keys=("r7", "r8", "r9"), sign_with=("r7", "r8"),
                      publishers={"p9": ("*",)})
    trust_state.install_first_root(stranger, other.to_bytes(), other.root.fingerprint, NOW)
    with pytest.raises(ThresholdError):
        fetch_from(stranger, data, [])
    assert list_models(stranger, include_importing=True) == []


def test_ssl_torrent_members_fetch_and_a_non_member_is_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tls.init_site(ca)
    seeder_id = member(tmp_path, ca, "seeder")
    fetcher_id = member(tmp_path, ca, "fetcher")
    bundle = two_file_bundle()
    seed_store = seeded_host(tmp_path / "seed", bundle)
    data, _ = model_torrent(seed_store, MODEL, root_cert=seeder_id.ca_pem)
    assert lt.torrent_info(data).ssl_cert()
    # Another site's CA: a certificate that does not chain to ours.
    other_ca = tmp_path / "other-ca"
    tls.init_site(other_ca)
    outsider = member(tmp_path, other_ca, "outsider")
    # The outsider knows our (public) CA certificate, but has no certificate from it.
    impostor = TorrentIdentity(outsider.cert_pem, outsider.key_pem, seeder_id.ca_pem)
    with Seeder(seed_store, replace(LOOPBACK), identity=seeder_id) as seeder:
        seeder.add_published()
        refused = trusted_store(tmp_path / "outsider-store")
        with pytest.raises(PeerError, match="no torrent peer delivered"):
            fetch_from(refused, data, [seeder], identity=impostor, wait=3.0)
        assert list_models(refused) == []
        with pytest.raises(UsageError, match="SSL torrent"):
            fetch_from(refused, data, [seeder], identity=None)
        with pytest.raises(UsageError, match="another site's CA"):
            fetch_from(refused, data, [seeder], identity=load_torrent_identity(
                tmp_path / "tls-outsider"))
        store = trusted_store(tmp_path / "member-store")
        result = fetch_from(store, data, [seeder], identity=fetcher_id)
    assert result.complete and verify_store(store).ok


def test_plaintext_torrent_needs_insecure(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tls.init_site(ca)
    identity = member(tmp_path, ca, "host")
    data, _ = model_torrent(seeded_host(tmp_path / "seed", two_file_bundle()), MODEL,
                            root_cert=None)
    with pytest.raises(UsageError, match="plaintext"):
        fetch_from(trusted_store(tmp_path / "f"), data, [], identity=identity)


def test_a_peer_sending_corrupt_pieces_is_banned_and_nothing_lands(tmp_path: Path) -> None:
    bundle = two_file_bundle()
    seed_store = seeded_host(tmp_path / "seed", bundle)
    data, _ = model_torrent(seed_store, MODEL, root_cert=None)
    store = trusted_store(tmp_path / "fetcher")
    notes: list[str] = []
    with LyingPeer(lt.torrent_info(data)) as liar:
        with pytest.raises(PeerError, match="no torrent peer delivered"):
            fetch_from(store, data, [liar], wait=8.0, notes=notes)
        assert liar.blocks_sent > 0
    assert f"banned torrent peer 127.0.0.1:{liar.port} (sent data that failed the hash)" in notes
    assert any("failed libtorrent's hash check" in n for n in notes)
    assert held(store) == 0 and list_models(store) == []
    with Seeder(seed_store, LOOPBACK, identity=None) as seeder:
        seeder.add_published()
        result = fetch_from(store, data, [seeder])
    assert result.complete and verify_store(store).ok


def test_fetch_by_magnet_gets_the_signed_manifest_from_the_swarm(tmp_path: Path) -> None:
    bundle = two_file_bundle()
    seed_store = seeded_host(tmp_path / "seed", bundle)
    with Seeder(seed_store, LOOPBACK, identity=None) as seeder:
        (seeded,) = seeder.add_published()
        store = trusted_store(tmp_path / "fetcher")
        result = fetch_from(store, seeded.magnet, [seeder])
    assert result.complete and result.infohash == seeded.infohash
    assert verify_store(store).ok


def test_fetch_killed_with_sigkill_resumes(tmp_path: Path) -> None:
    """The real CLI in a child, killed once chunks are durable; the next fetch asks the swarm
    only for the rest (clock: the CLI's, so the bundle is signed for today)."""
    today = datetime.now(UTC)
    bundle = make_bundle({MODEL: {"weights.bin": model_bytes(3, 3_000_000)}},
                         created=today - timedelta(days=1), expires=today + timedelta(days=30))
    seed_store = seeded_host(tmp_path / "seed", bundle)
    data, _ = model_torrent(seed_store, MODEL, root_cert=None)
    torrent_file = tmp_path / "tiny.torrent"
    torrent_file.write_bytes(data)
    store = trusted_store(tmp_path / "fetcher")
    with Seeder(seed_store, LOOPBACK, identity=None) as seeder:
        seeder.add_published()
        seeder.set_upload_rate(600_000)
        child = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "--store", str(store), "torrent",
             "fetch", str(torrent_file), "--insecure", "--no-lsd", "--listen", "127.0.0.1:0",
             "--peer", f"127.0.0.1:{seeder.port}"],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while held(store) < 5 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        child.kill()
        _, stderr = child.communicate()
        assert child.returncode == -signal.SIGKILL, stderr.decode()
        durable = held(store)
        assert durable >= 5
        seeder.set_upload_rate(0)
        result = fetch_from(store, data, [seeder], now=today)
    assert result.complete and result.already_done_bytes > 0
    assert result.bytes_fetched < bundle.size
    assert verify_store(store).ok
