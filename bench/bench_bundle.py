"""Bundle build and verify throughput against the native tools doing the same work.

- build: ``appliance.bundle.builder.build_bundle`` (chunk, BLAKE3, zstd, sha256, packs,
  fsync, manifest, signature) vs ``zstd -1 -T0 FILE -o OUT`` plus ``b3sum FILE`` (the sum of
  both times; zstd writes a file but does not fsync it).
- verify: ``appliance.bundle.verify.verify_media`` (signatures, structure, read, decompress
  and BLAKE3 every chunk) vs ``b3sum FILE``.
- parity: a 3+1 build (three data volumes and one zfec parity volume, ``--parity 1``) vs the
  same three volumes without parity (issue 18's aim: parity costs at most 1.5x); gemma only.

Same files, same run: gemma3-270m when installed (else generated weights that look
quantized), and with ``--large`` the generated 6.3 GB GGUF and its split variant
(``bench.large_model``). Each side runs in its own child process (``bench.harness.Pair``):
median of three alternating runs, peak RSS of each; the source is read once first, and the
table states how much of the inputs the page cache held before each run.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle.builder import build_bundle
from appliance.bundle.verify import verify_media
from appliance.format.trust import parse_signed_root
from bench.harness import (
    BenchContext,
    Comparison,
    Measured,
    Pair,
    Subject,
    mb_per_s,
    run_child,
    run_measured,
    run_native,
    subjects,
    timed,
)
from bench.signed_bundle import BenchBundle, prepare


def child_build(recipe: str, key: str, root_path: str, now: str, out: str,
                volume_size: int | None = None, parity: int = 0) -> None:
    build_bundle(Path(recipe), [Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key))],
                 Path(out), trust_chain=[Path(root_path)], now=datetime.fromisoformat(now),
                 volume_size=volume_size, parity=parity)


def child_verify(recipe: str, key: str, root_path: str, now: str, media: str) -> None:
    root = parse_signed_root(Path(root_path).read_bytes()).root
    verify_media([Path(media)], root, datetime.fromisoformat(now))


def native_build(files: tuple[Path, ...], zst: Path) -> Measured:
    argvs = [["zstd", "-q", "-1", "-T0", "-f", str(p), "-o", str(zst)] for p in files]
    return run_measured([*argvs, ["b3sum", *map(str, files)]])


def build_pair(setup: BenchBundle, work: Path, repeats: int) -> tuple[Pair, Path]:
    """Alternating builds; the first of ours is kept as ``work/media`` (for verify)."""
    media, scratch, zst = work / "media", work / "media-again", work / "native.zst"

    def reset() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        zst.unlink(missing_ok=True)

    def ours() -> Measured:
        out = scratch if media.exists() else media
        return run_child("bench.bench_bundle:child_build", **setup.child_args(), out=str(out))

    pair = Pair(repeats, cached=setup.files).run(
        ours, lambda: native_build(setup.files, zst), reset)
    return pair, media


def _parity(setup: BenchBundle, work: Path, repeats: int) -> Comparison:
    three = setup.size // 3 + (16 << 20)  # three data volumes, whatever the model's size
    plain_3: list[float] = []
    parity_3: list[float] = []
    for i in range(repeats):
        for runs, parity in ((plain_3, 0), (parity_3, 1)):
            out = work / f"media-3-{parity}-{i}"

            def build_3(out: Path = out, parity: int = parity) -> None:
                setup.build(out, volume_size=three, parity=parity)

            runs.append(timed(build_3))
            shutil.rmtree(out)
    what = f"{setup.label}, {setup.size / 1e6:.0f} MB"
    return Comparison(f"bundle build 3+1 parity ({what})", "MB/s",
                      mb_per_s(setup.size, min(parity_3)), mb_per_s(setup.size, min(plain_3)),
                      "the same 3 volumes without parity", f"best of {repeats}, in-process")


def _one(ctx: BenchContext, subject: Subject | None, work: Path, parity: bool
         ) -> list[Comparison]:
    setup = prepare(ctx, work, generated_mib=(48, 512), header_mib=4, salt=b"bench bundle",
                    model_when_quick=True, subject=subject)
    repeats = 1 if ctx.quick else 3
    run_native(["b3sum", *map(str, setup.files)])  # read once: the page cache as warm as fits
    build, media = build_pair(setup, work, repeats)
    verify = Pair(repeats, cached=[*setup.files, *sorted(media.rglob("*.zst"))]).run(
        lambda: run_child("bench.bench_bundle:child_verify", **setup.child_args(),
                          media=str(media)),
        lambda: run_measured([["b3sum", *map(str, setup.files)]]))
    what = f"{setup.label}, {setup.size / 1e6:.0f} MB"
    rows = [
        build.comparison(f"bundle build ({what})", setup.size, "zstd -1 -T0 FILE -o OUT + "
                         "b3sum FILE", "zstd does not fsync, the build does"),
        verify.comparison(f"bundle verify ({what})", setup.size, "b3sum FILE"),
    ]
    shutil.rmtree(media)
    if parity:
        rows.append(_parity(setup, work, repeats))
    return rows


def run(ctx: BenchContext) -> list[Comparison]:
    rows: list[Comparison] = []
    for n, subject in enumerate(subjects(ctx) or [None]):
        work = ctx.workdir / f"bench_bundle-{n}"
        try:
            rows += _one(ctx, subject, work, parity=n == 0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows
