"""Bundle build and verify throughput against the native tools doing the same work.

- build: ``appliance.bundle.builder.build_bundle`` (chunk, BLAKE3, zstd, sha256, packs,
  manifest, signature) vs ``zstd -1 -T0 FILE`` plus ``b3sum FILE`` (the sum of both times).
- verify: ``appliance.bundle.verify.verify_media`` (signatures, structure, read, decompress
  and BLAKE3 every chunk) vs ``b3sum FILE``.
- parity: a 3+1 build (three data volumes and one zfec parity volume, ``--parity 1``) vs the
  same three volumes without parity (issue 18's aim: parity costs at most 1.5x).

Same file, same run: the real gemma3-270m when installed, else a generated file that looks
like quantized weights (mostly incompressible, a compressible header). Each repetition runs
the native tool and ours back to back, so both see the same machine load; the best of the
repetitions is kept. Files are read from the page cache (warmed first) on both sides.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.bundle.verify import verify_media
from bench.harness import BenchContext, Comparison, mb_per_s, run_native, timed
from bench.signed_bundle import prepare


def run(ctx: BenchContext) -> list[Comparison]:
    work = ctx.workdir / "bench_bundle"
    setup = prepare(ctx, work, generated_mib=(48, 512), header_mib=4, salt=b"bench bundle",
                    model_when_quick=True)
    source, label, size, now, root = setup.source, setup.label, setup.size, setup.now, setup.root
    repeats = 1 if ctx.quick else 3
    run_native(["b3sum", str(source)])  # warm the page cache for both sides

    native_build, ours_build, native_verify, ours_verify = [], [], [], []
    media = work / "media"
    zst = work / "native.zst"
    zstd_argv = ["zstd", "-q", "-1", "-T0", "-f", str(source), "-o", str(zst)]
    for i in range(repeats):
        native_build.append(timed(lambda: run_native(zstd_argv))
                            + timed(lambda: run_native(["b3sum", str(source)])))
        zst.unlink()
        out = work / f"media-{i}"

        def build(out: Path = out) -> None:
            setup.build(out)

        ours_build.append(timed(build))
        if i == 0:
            out.rename(media)
        else:
            shutil.rmtree(out)
        native_verify.append(timed(lambda: run_native(["b3sum", str(source)])))
        ours_verify.append(timed(lambda: verify_media([media], root, now)))

    three = size // 3 + (16 << 20)  # three data volumes, whatever the model's size
    plain_3: list[float] = []
    parity_3: list[float] = []
    for i in range(repeats):
        for runs, parity in ((plain_3, 0), (parity_3, 1)):
            out = work / f"media-3-{parity}-{i}"

            def build_3(out: Path = out, parity: int = parity) -> None:
                setup.build(out, volume_size=three, parity=parity)

            runs.append(timed(build_3))
            shutil.rmtree(out)

    what = f"{label}, {size / 1e6:.0f} MB"
    note = f"best of {repeats}, page cache warm, {label}"
    return [
        Comparison(f"bundle build ({what})", "MB/s", mb_per_s(size, min(ours_build)),
                   mb_per_s(size, min(native_build)), "zstd -1 -T0 FILE + b3sum FILE", note),
        Comparison(f"bundle verify ({what})", "MB/s", mb_per_s(size, min(ours_verify)),
                   mb_per_s(size, min(native_verify)), "b3sum FILE", note),
        Comparison(f"bundle build 3+1 parity ({what})", "MB/s", mb_per_s(size, min(parity_3)),
                   mb_per_s(size, min(plain_3)), "the same 3 volumes without parity", note),
    ]
