"""Import throughput against ``cp`` of the same bytes on the same disk.

Ours: ``appliance.importer.import_media`` of a one-volume bundle into a fresh store: trust
chain and signatures, rollback state, free-space check, read the packs, decompress, BLAKE3
every chunk, pwrite into a preallocated staged file, fsync, whole-file hash, rename, index.

Native, same run, same disk: ``cp FILE DEST`` followed by ``sync DEST`` (the import fsyncs
before it publishes, so the baseline is made durable too); plain ``cp`` without the fsync is
reported as a second row for transparency. Each repetition runs both back to back into fresh
destinations, the best of the repetitions is kept, and source bytes are in the page cache.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle.builder import build_bundle
from appliance.format.signing import key_id, public_bytes
from appliance.format.trust import TrustKey, encode_envelope, parse_signed_root
from appliance.format.trust_build import new_root_body, sign_root_body
from appliance.importer import import_media
from appliance.store import trust_state
from bench.harness import BenchContext, Comparison, mb_per_s, run_native

MIB = 1 << 20


def _weights(path: Path, size: int) -> Path:
    """Quantized-weights look-alike: mostly incompressible bytes, a compressible header."""
    with path.open("wb") as f:
        header = b"tokenizer.ggml.tokens piece " * (2 * MIB // 28)
        f.write(header)
        offset = len(header)
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
        version=1,
        created=now - timedelta(days=1),
        expires=now + timedelta(days=30),
        keys=keys,
        root_keys=[keys[0].key_id],
        root_threshold=1,
        publisher_models={keys[1].key_id: ("*",)},
        publisher_threshold=1,
    )
    data = encode_envelope(body, sign_root_body(body, [root_key]))
    path = work / "root-1.yaml"
    path.write_bytes(data)
    return path, data, parse_signed_root(data).root.fingerprint


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _warm(paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as f:
            while f.read(16 * MIB):
                pass


def run(ctx: BenchContext) -> list[Comparison]:
    work = ctx.workdir / "bench_import"
    work.mkdir(parents=True, exist_ok=True)
    if ctx.model_path is not None and not ctx.quick:
        source, label = ctx.model_path, "gemma3-270m Q4_K_M"
    else:
        size = (48 if ctx.quick else 256) * MIB
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
    build_bundle(recipe, [publisher], media, trust_chain=[root_path], now=now)
    _warm([source, *sorted(media.rglob("*.zst"))])

    ours: list[float] = []
    native_sync: list[float] = []
    native_plain: list[float] = []
    for i in range(repeats):
        copy = work / f"cp-{i}"
        store = work / f"store-{i}"

        def cp_and_sync(copy: Path = copy) -> None:
            run_native(["cp", str(source), str(copy)])
            run_native(["sync", str(copy)])

        def cp(copy: Path = copy) -> None:
            run_native(["cp", str(source), str(copy)])

        def ours_import(store: Path = store) -> None:
            import_media(store, [media], now=now)

        native_sync.append(_timed(cp_and_sync))
        copy.unlink()
        native_plain.append(_timed(cp))
        copy.unlink()
        trust_state.install_first_root(store, root_bytes, fingerprint, now)
        ours.append(_timed(ours_import))
        shutil.rmtree(store)

    what = f"{label}, {size / 1e6:.0f} MB"
    note = f"best of {repeats}, one volume on the same disk, page cache warm"
    return [
        Comparison(
            f"import ({what})",
            "MB/s",
            mb_per_s(size, min(ours)),
            mb_per_s(size, min(native_sync)),
            "cp FILE DEST && sync DEST",
            note,
        ),
        Comparison(
            f"import vs cp without fsync ({what})",
            "MB/s",
            mb_per_s(size, min(ours)),
            mb_per_s(size, min(native_plain)),
            "cp FILE DEST",
            note + "; the import fsyncs, plain cp does not",
        ),
    ]
