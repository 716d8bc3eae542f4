"""Import and store-verify throughput against ``cp`` and ``b3sum`` of the same bytes.

Import: ``appliance.importer.import_media`` of a one-volume bundle into a fresh store: trust
chain and signatures, rollback state, free-space check, read the packs, BLAKE3 every chunk,
pwrite into a preallocated staged file, fsync, whole-file hash, rename, index. Native, same
run, same disk: ``cp FILE... DEST && sync DEST...`` (the import fsyncs before it publishes,
so the baseline is made durable too); plain ``cp`` without the fsync is a second row for
transparency (gemma only).

Store verify: ``appliance.store.scrub.verify_store`` (every chunk and the whole file re-hashed
against the index) of the store just imported vs ``b3sum`` of the same published files.

Each side runs in its own child process (``bench.harness.Pair``): median of alternating
runs, peak RSS of each; inputs are read once first, the table states how much of them the
page cache held before each run. Subjects: gemma, and with ``--large`` the generated
6.3 GB GGUF and its split variant.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

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

# The children import only what their side needs: the builder (numpy, via the chunker) that
# ``bench.signed_bundle`` pulls in took 0.3 s of CPU in every import child's figure.


def child_import(store: str, media: str, now: str) -> None:
    from appliance.importer import import_media

    import_media(Path(store), [Path(media)], now=datetime.fromisoformat(now))


def child_store_verify(store: str) -> None:
    from appliance.store.scrub import verify_store

    if not verify_store(Path(store)).ok:
        raise RuntimeError("store verify found damage in a store just imported")


def _one(ctx: BenchContext, subject: Subject | None, work: Path, plain_cp: bool
         ) -> list[Comparison]:
    from bench.signed_bundle import prepare

    setup = prepare(ctx, work, generated_mib=(48, 256), header_mib=2, subject=subject)
    repeats = 1 if ctx.quick else 3
    media = work / "media"
    setup.build(media)
    packs = sorted(media.rglob("*.zst"))
    run_native(["b3sum", *map(str, setup.files), *map(str, packs)])  # read once
    copy, store = work / "cp", work / "store"
    now = setup.now.isoformat()

    def reset() -> None:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)

    def cp(sync: bool) -> Measured:
        copy.mkdir()
        argvs = [["cp", *map(str, setup.files), str(copy)]]
        if sync:
            argvs.append(["sync", *(str(copy / p.name) for p in setup.files)])
        return run_measured(argvs)

    def ours() -> Measured:
        trust_state.install_first_root(store, setup.root_bytes, setup.fingerprint, setup.now)
        return run_child("bench.bench_import:child_import", store=str(store), media=str(media),
                         now=now)

    what = f"{setup.label}, {setup.size / 1e6:.0f} MB"
    note = "one volume on the same disk"
    imported = Pair(repeats, cached=packs).run(ours, lambda: cp(True), reset)
    rows = [imported.comparison(f"import ({what})", setup.size, "cp FILE DEST && sync DEST",
                                note)]
    if plain_cp:
        plain = Pair(repeats, cached=packs).run(ours, lambda: cp(False), reset)
        rows.append(plain.comparison(f"import vs cp without fsync ({what})", setup.size,
                                     "cp FILE DEST", note + "; the import fsyncs, cp does not"))
    ours()
    shutil.rmtree(media)  # the store is what store verify reads: room on the disk for it
    published = sorted(p for p in (store / "models").rglob("*") if p.is_file())
    run_native(["b3sum", *map(str, published)])  # read once
    checked = Pair(repeats, cached=published).run(
        lambda: run_child("bench.bench_import:child_store_verify", store=str(store)),
        lambda: run_measured([["b3sum", *map(str, published)]]))
    rows.append(checked.comparison(f"store verify ({what})", setup.size, "b3sum FILE"))
    return rows


def run(ctx: BenchContext) -> list[Comparison]:
    rows: list[Comparison] = []
    for n, subject in enumerate(subjects(ctx) or [None]):
        work = ctx.workdir / f"bench_import-{n}"
        try:
            rows += _one(ctx, subject, work, plain_cp=n == 0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows
