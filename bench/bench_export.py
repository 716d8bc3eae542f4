"""Export throughput (``appliance models export``) against ``cp`` + ``sha256sum`` + ``sync``.

Ours: ``appliance.store.export.export_dir`` (every chunk re-hashed with BLAKE3 against the
signed manifest, the whole file against its recorded identity, sha256 for SHA256SUMS, write,
fsync, rename) and ``export_ollama`` (the same into an Ollama store: blob, config, manifest
last) of a model imported into a fresh store. Native, same run, same disk: ``cp FILE DEST &&
sha256sum DEST && sync DEST`` (a copy, the checksum an operator would publish, durable; it
checks nothing against a signature, so it is the floor). Subject: gemma when installed
(both rows), else generated weights (``--dir`` only: an Ollama store wants a GGUF).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.store.export import export_dir, export_ollama
from bench.harness import BenchContext, Comparison, Measured, Pair, run_child, run_measured
from bench.signed_bundle import prepare


def child_export_dir(store: str, out: str) -> None:
    export_dir(Path(store), "bench", Path(out))


def child_export_ollama(store: str, out: str) -> None:
    export_ollama(Path(store), "bench", Path(out))


def run(ctx: BenchContext) -> list[Comparison]:
    work = ctx.workdir / "bench_export"
    try:
        return _run(ctx, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(ctx: BenchContext, work: Path) -> list[Comparison]:
    setup = prepare(ctx, work, generated_mib=(48, 256), header_mib=2)
    store, out = setup.seed_store(work / "store", work / "media"), work / "out"
    published = sorted(p for p in (store / "models").rglob("*") if p.is_file())
    repeats = 1 if ctx.quick else 3

    def reset() -> None:
        shutil.rmtree(out, ignore_errors=True)

    def native() -> Measured:
        out.mkdir()
        copies = [str(out / p.name) for p in published]
        return run_measured([["cp", *map(str, published), str(out)], ["sha256sum", *copies],
                             ["sync", *copies]])

    what = f"{setup.label}, {setup.size / 1e6:.0f} MB"
    tool = "cp FILE DEST && sha256sum DEST && sync DEST"
    rows = [Pair(repeats, cached=published).run(
        lambda: run_child("bench.bench_export:child_export_dir", store=str(store),
                          out=str(out)), native, reset).comparison(
        f"models export --dir ({what})", setup.size, tool)]
    if all(p.name.endswith(".gguf") for p in published) and len(published) == 1:
        rows.append(Pair(repeats, cached=published).run(
            lambda: run_child("bench.bench_export:child_export_ollama", store=str(store),
                              out=str(out)), native, reset).comparison(
            f"models export --ollama ({what})", setup.size, tool))
    return rows
