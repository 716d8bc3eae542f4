"""Bundle build and verify throughput against the native tools doing the same work.

- build: ``appliance.bundle.builder.build_bundle`` (chunk, BLAKE3, zstd, sha256, packs,
  manifest, signature) vs ``zstd -1 -T0 FILE`` plus ``b3sum FILE`` (the sum of both times).
- verify: ``appliance.bundle.reader.verify_media`` (signatures, structure, read, decompress
  and BLAKE3 every chunk) vs ``b3sum FILE``.

Same file, same run: the real gemma3-270m when installed, else a generated file that looks
like quantized weights (mostly incompressible, a compressible header). Each repetition runs
the native tool and ours back to back, so both see the same machine load; the best of the
repetitions is kept. Files are read from the page cache (warmed first) on both sides.
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
from appliance.bundle.reader import verify_media
from appliance.format.signing import key_id, public_bytes
from appliance.format.trust import TrustKey, TrustRoot, encode_envelope, parse_signed_root
from appliance.format.trust_build import new_root_body, sign_root_body
from bench.harness import BenchContext, Comparison, mb_per_s, run_native

MIB = 1 << 20


def _generated(path: Path, size: int) -> Path:
    """Quantized-weights look-alike: 4 MiB of text-like header, then pseudo-random bytes."""
    header = b"tokenizer.ggml.tokens piece " * (4 * MIB // 28)
    with path.open("wb") as f:
        f.write(header)
        offset = len(header)
        seed = blake3.blake3(b"bench bundle")
        while offset < size:
            n = min(16 * MIB, size - offset)
            f.write(seed.copy().update(offset.to_bytes(8, "little")).digest(length=n))
            offset += n
    return path


def _root(workdir: Path, publisher: Ed25519PrivateKey, now: datetime) -> tuple[Path, TrustRoot]:
    root_key = Ed25519PrivateKey.generate()
    keys = [TrustKey(key_id(public_bytes(k)), public_bytes(k), name)
            for k, name in ((root_key, "bench-root"), (publisher, "bench-publisher"))]
    body = new_root_body(
        version=1, created=now - timedelta(days=1), expires=now + timedelta(days=30), keys=keys,
        root_keys=[keys[0].key_id], root_threshold=1,
        publisher_models={keys[1].key_id: ("*",)}, publisher_threshold=1,
    )
    data = encode_envelope(body, sign_root_body(body, [root_key]))
    path = workdir / "root-1.yaml"
    path.write_bytes(data)
    return path, parse_signed_root(data).root


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(ctx: BenchContext) -> list[Comparison]:
    work = ctx.workdir / "bench_bundle"
    work.mkdir(parents=True, exist_ok=True)
    if ctx.model_path is not None:
        source, label = ctx.model_path, "gemma3-270m Q4_K_M"
    else:
        size = (48 if ctx.quick else 512) * MIB
        source, label = _generated(work / "weights.bin", size), "generated weights"
    size = source.stat().st_size
    repeats = 1 if ctx.quick else 3
    now = datetime.now(UTC)
    publisher = Ed25519PrivateKey.generate()
    root_path, root = _root(work, publisher, now)
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "channel: bench\nsequence: 1\nmodels:\n  - name: bench\n    version: v1\n"
        f"    files:\n      - path: {source}\n"
    )
    run_native(["b3sum", str(source)])  # warm the page cache for both sides

    native_build, ours_build, native_verify, ours_verify = [], [], [], []
    media = work / "media"
    zst = work / "native.zst"
    zstd_argv = ["zstd", "-q", "-1", "-T0", "-f", str(source), "-o", str(zst)]
    for i in range(repeats):
        native_build.append(_timed(lambda: run_native(zstd_argv))
                            + _timed(lambda: run_native(["b3sum", str(source)])))
        zst.unlink()
        out = work / f"media-{i}"

        def build(out: Path = out) -> None:
            build_bundle(recipe, [publisher], out, trust_chain=[root_path], now=now)

        ours_build.append(_timed(build))
        if i == 0:
            out.rename(media)
        else:
            shutil.rmtree(out)
        native_verify.append(_timed(lambda: run_native(["b3sum", str(source)])))
        ours_verify.append(_timed(lambda: verify_media([media], root, now)))

    what = f"{label}, {size / 1e6:.0f} MB"
    note = f"best of {repeats}, page cache warm, {label}"
    return [
        Comparison(f"bundle build ({what})", "MB/s", mb_per_s(size, min(ours_build)),
                   mb_per_s(size, min(native_build)), "zstd -1 -T0 FILE + b3sum FILE", note),
        Comparison(f"bundle verify ({what})", "MB/s", mb_per_s(size, min(ours_verify)),
                   mb_per_s(size, min(native_verify)), "b3sum FILE", note),
    ]
