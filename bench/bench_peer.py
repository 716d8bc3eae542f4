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
TLS (curl given the same site certificate). Best of the repetitions; page cache warm.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle.builder import build_bundle
from appliance.format.manifest import Manifest
from appliance.format.signing import key_id, public_bytes
from appliance.format.trust import TrustKey, encode_envelope, parse_signed_root
from appliance.format.trust_build import new_root_body, sign_root_body
from appliance.importer import import_media
from appliance.peer import tls
from appliance.peer.client import ConnectPolicy, PeerClient, connect_policy
from appliance.peer.protocol import chunk_path
from appliance.peer.pull import PullOptions, pull
from appliance.store import trust_state
from bench.harness import BenchContext, Comparison, mb_per_s, run_native

MIB = 1 << 20


def _weights(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        offset = 0
        while offset < size:
            n = min(16 * MIB, size - offset)
            f.write(blake3.blake3(offset.to_bytes(8, "little")).digest(length=n))
            offset += n
    return path


def _root(work: Path, publisher: Ed25519PrivateKey, now: datetime) -> tuple[Path, bytes, str]:
    root_key = Ed25519PrivateKey.generate()
    keys = [
        TrustKey(key_id(public_bytes(k)), public_bytes(k), name)
        for k, name in ((root_key, "bench-root"), (publisher, "bench-publisher"))
    ]
    body = new_root_body(
        version=1, created=now - timedelta(days=1), expires=now + timedelta(days=30), keys=keys,
        root_keys=[keys[0].key_id], root_threshold=1,
        publisher_models={keys[1].key_id: ("*",)}, publisher_threshold=1,
    )
    data = encode_envelope(body, sign_root_body(body, [root_key]))
    path = work / "root-1.yaml"
    path.write_bytes(data)
    return path, data, parse_signed_root(data).root.fingerprint


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def _measure(
    url: str, policy: ConnectPolicy, manifest: Manifest, root: tuple[bytes, str],
    work: Path, now: datetime, repeats: int, curl_tls: list[str],
) -> tuple[float, float]:
    refs = list(dict.fromkeys((c.digest, c.length) for _, _, c in manifest.iter_chunks()))
    ours: list[float] = []
    native: list[float] = []
    for i in range(repeats):
        out = Path(tempfile.mkdtemp(prefix=f"curl-{i}-", dir=work))
        argv = ["curl", "-sS", "--fail", *curl_tls]
        for n, (digest, _) in enumerate(refs):
            argv += ["-o", str(out / f"{n}"), f"{url}{chunk_path(digest)}"]

        def fetch(argv: list[str] = argv, out: Path = out) -> None:
            run_native(argv)
            run_native(["sync", *(str(p) for p in sorted(out.iterdir()))])

        native.append(_timed(fetch))
        shutil.rmtree(out)
        store = work / f"store-{i}"
        trust_state.install_first_root(store, root[0], root[1], now)
        with PeerClient(url, policy) as client:
            ours.append(_timed(lambda store=store, client=client: pull(  # type: ignore[misc]
                store, [client], ["bench"], options=PullOptions(), now=now)))
        shutil.rmtree(store)
    return min(ours), min(native)


def run(ctx: BenchContext) -> list[Comparison]:
    work = ctx.workdir / "bench_peer"
    work.mkdir(parents=True, exist_ok=True)
    if ctx.model_path is not None and not ctx.quick:
        source, label = ctx.model_path, "gemma3-270m Q4_K_M"
    else:
        size = (32 if ctx.quick else 256) * MIB
        source, label = _weights(work / "weights.bin", size), "generated weights"
    size = source.stat().st_size
    repeats = 1 if ctx.quick else 3
    now = datetime.now(UTC)
    publisher = Ed25519PrivateKey.generate()
    root_path, root_bytes, fingerprint = _root(work, publisher, now)
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "channel: bench\nsequence: 1\nmodels:\n  - name: bench\n    version: v1\n"
        f"    license: bench\n    files:\n      - path: {source}\n"
    )
    media = work / "media"
    built = build_bundle(recipe, [publisher], media, trust_chain=[root_path], now=now)
    seed = work / "seed"
    trust_state.install_first_root(seed, root_bytes, fingerprint, now)
    import_media(seed, [media], now=now)

    tls.init_site(work / "ca")
    tls.enroll_host("seed", work / "ca", work / "seed-tls")
    tls.enroll_host("puller", work / "ca", work / "puller-tls")
    puller = work / "puller-tls"
    curl_tls = ["--cacert", str(puller / tls.CA_CERT), "--cert", str(puller / tls.HOST_CERT),
                "--key", str(puller / tls.HOST_KEY)]
    rows = []
    what = f"{label}, {size / 1e6:.0f} MB, {built.unique_chunk_count} chunks"
    note = (f"best of {repeats}, loopback, one peer; ours verifies every chunk and publishes "
            "into a store, curl only downloads and syncs")
    for mode in ("plaintext", "mutual TLS"):
        secure = mode == "mutual TLS"
        # The server is another process, as on a real second host (and curl's server too).
        server = _ServerProcess(seed, work / "seed-tls" if secure else None)
        try:
            policy = connect_policy(puller if secure else None, insecure=not secure)
            ours, native = _measure(server.url, policy, built.manifest,
                                    (root_bytes, fingerprint), work, now, repeats,
                                    curl_tls if secure else [])
        finally:
            server.stop()
        rows.append(Comparison(
            f"peer pull, {mode} ({what})", "MB/s", mb_per_s(size, ours), mb_per_s(size, native),
            "curl -o CHUNK URL ... (one connection) && sync", note,
        ))
    return rows
