"""Peer pull throughput over loopback against ``curl`` fetching the same bytes from the same server.

Setup: a bundle (gemma3-270m when installed, else generated weights) is built and imported into
store A, which ``appliance.peer.server`` serves on 127.0.0.1.

Ours: ``appliance.peer.pull.pull`` into a fresh store B: manifest list, manifest + signatures
fetched and authenticated against B's trust root, rollback state, have-map, then every chunk
fetched (4 in flight), BLAKE3-checked on arrival, pwritten into a preallocated staged file,
fsynced, whole-file hash, rename, index: the model ends verified and servable.

Native, same run, same server: one ``curl`` process downloading every chunk URL of the model
over one kept-alive connection (``-o`` per chunk), then ``sync`` of the files: the same bytes
from the same server, made durable, with no verification. Rows for plaintext and for mutual
TLS (curl given the same site certificate); with ``--large`` the generated 6.3 GB GGUF and
its split variant over mutual TLS. Each side runs in its own child process
(``bench.harness.Pair``): median of alternating runs, peak RSS of each; the served files are
read once first (page cache warm as far as memory holds them).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.peer import tls
from appliance.peer.client import PeerClient, connect_policy
from appliance.peer.protocol import chunk_path
from appliance.peer.pull import PullOptions, pull
from appliance.store import trust_state
from bench.harness import (
    BenchContext,
    Comparison,
    Measured,
    Pair,
    Subject,
    run_child,
    run_measured,
    run_native,
    subjects,
)

if TYPE_CHECKING:
    from appliance.format.manifest import Manifest


class _ServerProcess:
    def __init__(self, store: Path, tls_dir: Path | None) -> None:
        mode = ["--tls-dir", str(tls_dir)] if tls_dir else ["--insecure"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "--store", str(store), "peer", "serve",
             "--listen", "127.0.0.1:0", "--no-advertise", *mode],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"on (https?://127\.0\.0\.1:\d+)", line)
        if found is None:
            self.stop()
            raise RuntimeError(f"the peer server did not start: {line!r}")
        self.url = found.group(1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def child_pull(store: str, url: str, tls_dir: str | None, now: str) -> None:
    policy = connect_policy(Path(tls_dir) if tls_dir else None, insecure=tls_dir is None)
    with PeerClient(url, policy) as client:
        pull(Path(store), [client], ["bench"], options=PullOptions(),
             now=datetime.fromisoformat(now))


def _measure(
    url: str, tls_dir: Path | None, manifest: Manifest, root: tuple[bytes, str],
    work: Path, now: datetime, repeats: int, curl_tls: list[str],
) -> Pair:
    refs = list(dict.fromkeys((c.digest, c.length) for _, _, c in manifest.iter_chunks()))
    out, store = work / "curl", work / "puller-store"
    argv = ["curl", "-sS", "--fail", *curl_tls]
    for n, (digest, _) in enumerate(refs):
        argv += ["-o", str(out / f"{n}"), f"{url}{chunk_path(digest)}"]

    def reset() -> None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)

    def fetch() -> Measured:
        out.mkdir()
        return run_measured([argv, ["sync", *(str(out / f"{n}") for n in range(len(refs)))]])

    def ours() -> Measured:
        trust_state.install_first_root(store, root[0], root[1], now)
        return run_child("bench.bench_peer:child_pull", store=str(store), url=url,
                         tls_dir=str(tls_dir) if tls_dir else None, now=now.isoformat())

    return Pair(repeats).run(ours, fetch, reset)


def _one(ctx: BenchContext, subject: Subject | None, work: Path, plaintext: bool
         ) -> list[Comparison]:
    # Here, not at the top: the pull's child process imports this module for child_pull, and
    # its CPU is measured; `appliance peer pull` imports neither the builder nor the importer.
    from appliance.importer import import_media
    from bench.signed_bundle import prepare

    setup = prepare(ctx, work, generated_mib=(32, 256), subject=subject)
    label, size, now = setup.label, setup.size, setup.now
    root_bytes, fingerprint = setup.root_bytes, setup.fingerprint
    repeats = 1 if ctx.quick else 3
    media = work / "media"
    built = setup.build(media)
    seed = work / "seed"
    trust_state.install_first_root(seed, root_bytes, fingerprint, now)
    import_media(seed, [media], now=now)
    shutil.rmtree(media)  # room on the disk: the seed's store is what is served

    tls.init_site(work / "ca")
    tls.enroll_host("seed", work / "ca", work / "seed-tls")
    tls.enroll_host("puller", work / "ca", work / "puller-tls")
    puller = work / "puller-tls"
    curl_tls = ["--cacert", str(puller / tls.CA_CERT), "--cert", str(puller / tls.HOST_CERT),
                "--key", str(puller / tls.HOST_KEY)]
    published = sorted(p for p in (seed / "models").rglob("*") if p.is_file())
    run_native(["b3sum", *map(str, published)])  # the served files read once
    rows = []
    what = f"{label}, {size / 1e6:.0f} MB, {built.unique_chunk_count} chunks"
    note = ("loopback, one peer; ours verifies every chunk and publishes into a store, curl "
            "only downloads and syncs")
    for mode in ("plaintext", "mutual TLS") if plaintext else ("mutual TLS",):
        secure = mode == "mutual TLS"
        # The server is another process, as on a real second host (and curl's server too).
        server = _ServerProcess(seed, work / "seed-tls" if secure else None)
        try:
            pair = _measure(server.url, puller if secure else None, built.manifest,
                            (root_bytes, fingerprint), work, now, repeats,
                            curl_tls if secure else [])
        finally:
            server.stop()
        rows.append(pair.comparison(f"peer pull, {mode} ({what})", size,
                                    "curl -o CHUNK URL ... (one connection) && sync", note))
    return rows


def run(ctx: BenchContext) -> list[Comparison]:
    rows: list[Comparison] = []
    for n, subject in enumerate(subjects(ctx) or [None]):
        if subject is not None and len(subject.files) > 1:
            continue  # for time: a split model pulls file by file the same way
        work = ctx.workdir / f"bench_peer-{n}"
        try:
            rows += _one(ctx, subject, work, plaintext=n == 0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows
