"""What torrent commands leave in STORE/torrent-scratch and ``store gc`` (appliance.torrent.scratch,
appliance.store.scrub.gc), done chunks kept aside by a fetch that is killed and then finished by
another entry point (appliance.torrent.storage.Guard), and the partial seed's look at the index
(appliance.torrent.partial). Real stores, real libtorrent sessions and CLI processes on
loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import libtorrent as lt
import pytest
from bundle_helpers import Bundle
from peer_helpers import FAST, client, published_bytes, seed, start_server
from torrent_helpers import (
    LOOPBACK,
    MODEL,
    LyingPeer,
    fetch_from,
    held,
    seeded_host,
    two_file_bundle,
)
from trust_helpers import NOW, trusted_store

from appliance.cli.main import main
from appliance.peer.pull import pull
from appliance.store import layout
from appliance.store.scrub import gc, verify_store
from appliance.store.store import Store
from appliance.torrent import meta, scratch
from appliance.torrent.make import model_torrent
from appliance.torrent.partial import StagedSeeds
from appliance.torrent.seed import Seeder

REPO = Path(__file__).resolve().parent.parent


def _cli_fetch(store: Path, torrent: str, peers: list[int]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "--store", str(store), "torrent", "fetch",
         torrent, "--insecure", "--no-lsd", "--listen", "127.0.0.1:0", "--timeout", "60",
         *(arg for port in peers for arg in ("--peer", f"127.0.0.1:{port}"))],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr.decode()


def _wait_for(what: str, ready: object, child: subprocess.Popen[bytes], seconds: float = 20.0
              ) -> None:
    deadline = time.monotonic() + seconds
    while not ready() and child.poll() is None:  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)
    assert child.poll() is None, f"the fetch exited before {what}"


def _stage_all_but_chunk_5(store: Path, bundle: Bundle) -> None:
    """The model importing with every chunk verified but chunk 5 of weights.bin."""
    seed(store, bundle, partial_chunks=0)
    with Store(store) as opened:
        model_id = opened.begin_model(bundle.manifest.models[0], bundle.hash, NOW)
        assert model_id is not None
        for sf in opened.stage_files(model_id, NOW):
            contents = bundle.contents[MODEL][sf.path]
            for c in sf.pending():
                if (sf.path, c.idx) != ("weights.bin", 5):
                    sf.write_chunk(c.idx, contents[c.offset:c.offset + c.length])
            sf.close()


def test_gc_keeps_a_held_scratch_directory_and_removes_it_once_let_go(tmp_path: Path) -> None:
    store = trusted_store(tmp_path / "store")
    target = tmp_path / "staged.part"
    target.write_bytes(b"x" * 1000)
    work = scratch.scratch_root(store) / "make-test"
    with scratch.held(work):
        (work / "files").mkdir()
        (work / "files" / "weights.bin").symlink_to(target)
        (work / "plain").write_bytes(b"y" * 4096)
        assert gc(store).removed == []
        assert (work / "plain").exists()
    # What a gc killed while deleting leaves, and a stray file, go too.
    (scratch.scratch_root(store) / ".gc-make-old.123" / "guard").mkdir(parents=True)
    (scratch.scratch_root(store) / ".gc-make-old.123" / "guard" / ("0" * 64)).write_bytes(b"z")
    (scratch.scratch_root(store) / "stray").write_bytes(b"s" * 10)
    report = gc(store)
    assert sorted(report.removed) == sorted([work, scratch.scratch_root(store) / "stray",
                                             scratch.scratch_root(store) / ".gc-make-old.123"])
    assert report.freed_bytes == 4096 + 10 + 1
    assert target.read_bytes() == b"x" * 1000  # the link went, not the file it points at
    assert not scratch.scratch_root(store).exists()


def test_a_holder_that_opened_a_directory_being_swept_works_in_a_new_one(tmp_path: Path) -> None:
    """gc renames a directory away while it holds it; a command that opened it just then
    must not work in the renamed one (it is being deleted)."""
    import fcntl
    import os

    work = scratch.scratch_root(tmp_path) / "seed-abc"
    work.mkdir(parents=True)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what sweep holds while it renames
    got: list[int] = []
    release = threading.Event()

    def hold() -> None:
        with scratch.held(work) as directory:
            got.append(os.stat(directory).st_ino)
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.3)  # the holder has opened the old directory and waits for the lock
    aside = work.with_name(".gc-seed-abc")
    os.rename(work, aside)
    old = os.fstat(fd).st_ino
    os.close(fd)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert got and got[0] != old and work.is_dir()
        swept = [s.path for s in scratch.sweep(tmp_path)]
        assert work.is_dir() and work not in swept  # the new one is held
    finally:
        release.set()
        holder.join()


def test_a_partial_seed_reads_the_index_only_when_it_changed(tmp_path: Path) -> None:
    bundle = two_file_bundle(3_000_000)
    data, _ = model_torrent(seeded_host(tmp_path / "full", bundle), MODEL, root_cert=None)
    importing = trusted_store(tmp_path / "importing")
    seed(importing, bundle, partial_chunks=20)
    links = scratch.scratch_root(importing) / f"seed-{meta.infohash(lt.torrent_info(data))}"
    with Seeder(importing, LOOPBACK, identity=None) as seeder:
        staged = StagedSeeds(seeder, refresh_s=0.0, reoffer_s=0.0)
        try:
            staged.add(data)
            entry = staged.staged[0]
            before = entry.held
            for _ in range(50):
                staged.refresh()
            assert staged.reads == 0 and entry.held == before  # nothing committed meanwhile
            seed(importing, bundle, partial_chunks=60)  # the import goes on, elsewhere
            staged.refresh()
            assert staged.reads == 1 and entry.held > before
            staged.refresh()
            assert staged.reads == 1
            # A re-add drops the torrent's peers: one per reoffer_s, the growth seen later.
            staged.reoffer_s = 3600.0
            grown = entry.held
            seed(importing, bundle, partial_chunks=60)
            staged.refresh()
            staged.refresh()
            assert staged.reads == 3 and entry.held == grown
            assert links.is_dir() and links not in gc(importing).removed  # held while seeded
        finally:
            staged.close()
    assert links in gc(importing).removed


def _seeded_torrent(tmp_path: Path, today: datetime) -> tuple[Bundle, Path, bytes, Path]:
    """A 3 MB two-file model seeded in ``tmp_path/seed``, its torrent's bytes and file."""
    bundle = two_file_bundle(3_000_000, now=today)
    seed_store = seeded_host(tmp_path / "seed", bundle)
    data, _ = model_torrent(seed_store, MODEL, root_cert=None)
    torrent_file = tmp_path / "tiny.torrent"
    torrent_file.write_bytes(data)
    return bundle, seed_store, data, torrent_file


@pytest.mark.slow  # two CLI processes and a throttled real swarm
def test_gc_removes_what_a_sigkilled_fetch_left_but_not_a_running_fetchs_scratch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    today = datetime.now(UTC)
    _, seed_store, data, torrent_file = _seeded_torrent(tmp_path, today)
    other, _ = model_torrent(seeded_host(tmp_path / "other", two_file_bundle(seed_value=2)),
                             MODEL, root_cert=None)
    store = trusted_store(tmp_path / "fetcher")
    root = scratch.scratch_root(store)
    killed = root / meta.infohash(lt.torrent_info(data))
    waiting = root / meta.infohash(lt.torrent_info(other))
    with Seeder(seed_store, LOOPBACK, identity=None) as seeder:
        seeder.add_published()
        seeder.set_upload_rate(600_000)
        child = _cli_fetch(store, str(torrent_file), [seeder.port])
        _wait_for("held 5 chunks", lambda: held(store) >= 5, child)
        _kill(child)
        assert (killed / "files").is_dir()
        # A magnet fetch waiting for its info dict (no peer has it) holds its directory.
        magnet = _cli_fetch(store, f"magnet:?xt=urn:btmh:1220{waiting.name}", [])
        try:
            _wait_for("made its scratch directory", waiting.is_dir, magnet)
            time.sleep(0.5)
            capsys.readouterr()
            assert main(["--store", str(store), "store", "gc", "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
            assert str(killed) in report["removed"] and str(waiting) not in report["removed"]
            assert not killed.exists() and waiting.is_dir()
        finally:
            _kill(magnet)
        assert gc(store).removed == [waiting]
        seeder.set_upload_rate(0)
        result = fetch_from(store, data, [seeder], now=today)  # gc kept what resumes
    assert result.complete and result.already_done_bytes > 0 and verify_store(store).ok


@pytest.mark.slow  # a CLI fetch killed while a lying peer's blocks sit in a done chunk
def test_a_fetch_killed_over_a_lying_peer_then_finished_by_a_peer_pull_is_the_signed_model(
        tmp_path: Path) -> None:
    """Chunks are 16 KiB, pieces 32 KiB: with every chunk but chunk 5 done, the one piece
    wanted is chunks 4 and 5, and the liar's garbage for it lands on done chunk 4. The fetch
    is killed then; a peer pull (which knows nothing of torrents) finishes the model. The chunk was
    marked not done while libtorrent could write it, so the pull takes it again: the
    published model is the signed one, and gc removes the kept copy."""
    today = datetime.now(UTC)
    bundle, seed_store, data, torrent_file = _seeded_torrent(tmp_path, today)
    store = trusted_store(tmp_path / "fetcher")
    _stage_all_but_chunk_5(store, bundle)
    weights = bundle.contents[MODEL]["weights.bin"]
    (staged,) = [p for p in layout.staging_dir(store).iterdir()
                 if p.stat().st_size == len(weights)]
    chunk = next(f for f in bundle.manifest.models[0].files if f.path == "weights.bin").chunks[4]
    good = weights[chunk.offset:chunk.offset + chunk.length]

    def overwritten() -> bool:
        with open(staged, "rb") as f:
            f.seek(chunk.offset)
            return f.read(chunk.length) != good

    kept = scratch.scratch_root(store) / meta.infohash(lt.torrent_info(data))
    with LyingPeer(lt.torrent_info(data)) as liar:
        child = _cli_fetch(store, str(torrent_file), [liar.port])
        _wait_for("got the liar's blocks into done chunk 4", overwritten, child)
        _kill(child)
    assert (kept / "guard" / chunk.digest).read_bytes() == good
    chunks = sum(len(f.chunks) for f in bundle.manifest.models[0].files)
    assert held(store) == chunks - 2  # chunk 4 is not claimed while its bytes may be anyone's
    server = start_server(seed_store)
    try:
        with client(server.url) as peer:
            [result] = pull(store, [peer], [MODEL], options=FAST, now=today)
    finally:
        server.stop()
    assert result.models == [f"{MODEL}:1"] and result.bytes_fetched >= 2 * chunk.length
    for path, contents in bundle.contents[MODEL].items():
        assert published_bytes(store, MODEL, path) == contents
    assert verify_store(store).ok
    report = gc(store)
    assert kept in report.removed and report.freed_bytes >= chunk.length
    assert not scratch.scratch_root(store).exists()
