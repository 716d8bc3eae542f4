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
from pathlib import Path

from appliance.importer import import_media
from appliance.store import trust_state
from bench.harness import BenchContext, Comparison, mb_per_s, run_native, timed
from bench.signed_bundle import MIB, prepare


def _warm(paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as f:
            while f.read(16 * MIB):
                pass


def run(ctx: BenchContext) -> list[Comparison]:
    work = ctx.workdir / "bench_import"
    setup = prepare(ctx, work, generated_mib=(48, 256), header_mib=2)
    source, label, size, now = setup.source, setup.label, setup.size, setup.now
    repeats = 1 if ctx.quick else 3
    media = work / "media"
    setup.build(media)
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

        native_sync.append(timed(cp_and_sync))
        copy.unlink()
        native_plain.append(timed(cp))
        copy.unlink()
        trust_state.install_first_root(store, setup.root_bytes, setup.fingerprint, now)
        ours.append(timed(ours_import))
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
