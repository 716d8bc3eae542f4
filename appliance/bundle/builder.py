"""Build a signed bundle from a recipe onto media.

``build_bundle`` reads every source file once, front to back: each planned chunk
(``appliance.chunker.plan_spans``) is hashed (BLAKE3) and compressed (zstd) in a thread pool
while the main thread reads ahead and keeps the upstream sha256; results are consumed in
order, so packs are written sequentially and each distinct chunk is stored once per bundle.
At most a few chunks are in flight, so memory stays flat whatever the model size.

Crash safety: everything is written into a hidden staging directory inside ``--out`` and
moved into place only at the end; each volume's signatures and then ``manifest.yaml`` are
written last, so a failed or interrupted build never leaves a volume that looks complete
(readers require ``manifest.yaml``). Nothing is written outside ``--out``.

Public API: ``build_bundle(recipe_path, keys, out_dir, *, trust_chain, volume_size,
pack_size, progress) -> BuildResult``; the plan is ``appliance.bundle.build_plan``, each
chunk's hashing and compression ``appliance.bundle.chunk_work``, and co-signing an existing
bundle ``appliance.bundle.signers.add_signature``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import __version__, fsutil
from appliance.bundle.build_plan import PlannedFile, plan_recipe, volume_reserve
from appliance.bundle.chunk_work import Work, digest_and_compress
from appliance.bundle.media import (
    COMPRESSION_LEVEL,
    INDEX_NAME,
    MANIFEST_NAME,
    SIGNATURE_SUFFIX,
    SIGNATURES_DIR,
    TRUST_DIR,
    MappedRange,
    PackWriter,
    VolumeIndex,
    encode_index,
    root_file_name,
    volume_name,
)
from appliance.bundle.oms import carry_signatures, sign_recipe
from appliance.bundle.parity import finish_parity, write_parity
from appliance.bundle.recipe import Recipe, load_recipe
from appliance.bundle.signers import check_keys_against_root, load_chain
from appliance.chunker import Span
from appliance.errors import (
    FormatError,
    IntegrityError,
    MediaError,
    RecipeError,
    TruncatedError,
    UsageError,
)
from appliance.format.manifest import (
    FORMAT_VERSION,
    ChunkRef,
    FileEntry,
    Manifest,
    ModelEntry,
    Provenance,
    SourceRecord,
    manifest_bytes,
    manifest_hash,
    parse_manifest,
)
from appliance.format.merkle import merkle_root
from appliance.format.parity_field import ParitySection
from appliance.format.signing import DOMAIN_MANIFEST, Signature, sign
from appliance.format.trust import SignedRoot
from appliance.limits import (
    DEFAULT_LIMITS,
    DEFAULT_PACK_BYTES,
    MAX_CHUNK_BYTES,
    Limits,
)

Progress = Callable[[int, int], None]
STAGING_PREFIX = ".appliance-build-"
@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    volumes: tuple[Path, ...]
    manifest: Manifest
    manifest_hash: str
    signers: tuple[str, ...]
    total_bytes: int  # plain bytes of every file
    unique_bytes: int  # plain bytes of the distinct chunks
    stored_bytes: int  # bytes written into packs
    chunk_count: int
    unique_chunk_count: int
    seconds: float
    parity_volumes: tuple[Path, ...] = ()  # par-NNN, with --parity


@dataclass
class _Volume:
    number: int
    path: Path
    writer: PackWriter
    first_ordinal: int
    entries: int = 0


@dataclass
class _State:
    out_dir: Path
    staging: Path
    created_out: bool
    moved: list[Path] = field(default_factory=list)
    volumes: list[_Volume] = field(default_factory=list)


def _prepare_out(out_dir: Path) -> tuple[bool, Path]:
    created = False
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"--out {out_dir} exists and is not a directory")
        for entry in out_dir.iterdir():
            if entry.name.startswith(STAGING_PREFIX):  # left by an interrupted build of ours
                shutil.rmtree(entry, ignore_errors=True)
            else:
                raise UsageError(f"--out {out_dir} is not empty; give a new or empty directory")
    else:
        try:
            out_dir.mkdir(parents=False)
        except FileNotFoundError as e:
            raise UsageError(f"the parent of --out {out_dir} does not exist") from e
        except OSError as e:
            raise MediaError(f"cannot create {out_dir}: {e}") from e
        created = True
    staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return created, staging


def build_bundle(
    recipe_path: Path,
    keys: Sequence[Ed25519PrivateKey],
    out_dir: Path,
    *,
    trust_chain: Sequence[Path] = (),
    volume_size: int | None = None,
    pack_size: int = DEFAULT_PACK_BYTES,
    progress: Progress | None = None,
    now: datetime | None = None,
    workers: int | None = None,
    compression_level: int = COMPRESSION_LEVEL,
    limits: Limits = DEFAULT_LIMITS,
    parity: int = 0,
    oms_key: Path | None = None,
    oms_signatures: Mapping[str, Path] | None = None,
    notify: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build the bundle described by ``recipe_path`` into ``out_dir``, signed by ``keys``.

    ``trust_chain``: trust root files to carry (plus the recipe's ``trust:``), so sites can
    walk from their installed root to the signers. ``volume_size``: split into
    ``out_dir/vol-NNN`` volumes of at most this many bytes each (else one volume in
    ``out_dir``). ``pack_size``: the largest pack file. ``progress(done, total)`` gets plain
    bytes read. ``notify(line)`` gets a line before and after long steps before packing
    (quantizing, downloading); quantized files live in a temporary directory (TMPDIR).
    Raises UsageError, RecipeError, MediaError; never leaves a complete-looking
    half bundle.
    """
    started = time.perf_counter()
    if not keys:
        raise UsageError("a bundle needs at least one signing key (--key)")
    if not MAX_CHUNK_BYTES <= pack_size <= limits.max_pack_bytes:
        raise UsageError(
            f"pack size must be between {MAX_CHUNK_BYTES} and {limits.max_pack_bytes} bytes "
            "(FAT32 cannot hold 4 GiB files)"
        )
    if parity and volume_size is None:
        raise UsageError("--parity needs --volume-size: parity volumes rebuild split volumes")
    recipe = load_recipe(recipe_path, limits)
    if oms_key is not None and oms_signatures:
        raise UsageError("give --oms-key (sign now) or --oms-signature (carry one), not both")
    if oms_signatures:
        recipe = carry_signatures(recipe, oms_signatures)
    # OMS signatures made now stay in a temporary directory until this function returns.
    recipe, _oms_work = sign_recipe(recipe, oms_key) if oms_key is not None else (recipe, None)
    chain = load_chain([*recipe.trust, *trust_chain], limits)
    check_keys_against_root(keys, chain)
    # Quantized files (recipe quantize:) stay in a temporary directory until this returns.
    _scratch = tempfile.TemporaryDirectory(prefix="appliance-build-")
    planned = plan_recipe(recipe, limits, Path(_scratch.name), notify)
    total = sum(f.size for files in planned for f in files)
    if total == 0:
        raise RecipeError("every file in the recipe is empty")
    budget = None
    if volume_size is not None:
        reserve = volume_reserve(planned, sum(len(b) for _, b in chain), len(keys),
                                  pack_size, volume_size)
        budget = volume_size - reserve
        largest = max(s.length for files in planned for f in files for s in f.spans)
        if budget < largest:
            raise UsageError(
                f"--volume-size {volume_size} is too small for this bundle: it needs at "
                f"least {reserve + largest} bytes per volume"
            )
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    created_out, staging = _prepare_out(out_dir)
    state = _State(out_dir=out_dir, staging=staging, created_out=created_out)
    try:
        models, counts = _write_packs(recipe, planned, state, pack_size, budget, total,
                                      progress, workers, compression_level)
        section: ParitySection | None = None
        parity_dirs: list[Path] = []
        if parity:
            parity_staging = out_dir / f"{STAGING_PREFIX}parity-{secrets.token_hex(4)}"
            parity_staging.mkdir()
            state.moved.append(parity_staging)  # removed by _cleanup if the build fails
            section, parity_dirs = write_parity([v.path for v in state.volumes],
                                                parity_staging, parity)
        manifest = Manifest(
            parity=section,
            format_version=FORMAT_VERSION, channel=recipe.channel, sequence=recipe.sequence,
            created=moment, expires=moment + timedelta(days=recipe.expires_days),
            models=tuple(models),
        )
        data = manifest_bytes(manifest)
        try:
            parse_manifest(data, limits)
        except FormatError as e:
            raise RecipeError(f"the bundle would not be readable: {e}") from e
        signatures = [sign(k, DOMAIN_MANIFEST, data) for k in keys]
        final = _finish(state, data, signatures, chain, counts["unique"],
                        split=volume_size is not None)
        parity_final = finish_parity(parity_dirs, out_dir, final, data, signatures, chain,
                                     state.moved) if parity else []
        if parity:
            parity_staging.rmdir()
    except BaseException:
        _cleanup(state)
        raise
    return BuildResult(
        out_dir=out_dir, volumes=tuple(final), manifest=manifest,
        manifest_hash=manifest_hash(data),
        signers=tuple(dict.fromkeys(s.key_id for s in signatures)), total_bytes=total,
        unique_bytes=counts["unique_bytes"], stored_bytes=counts["stored"],
        chunk_count=counts["chunks"], unique_chunk_count=counts["unique"],
        seconds=time.perf_counter() - started, parity_volumes=tuple(parity_final),
    )


class _Packer:
    """Consumes (span, digest, stored) results in file order: dedup, volumes, packs."""

    def __init__(self, state: _State, pack_size: int, budget: int | None, total: int,
                 progress: Progress | None) -> None:
        self.state, self.pack_size, self.budget = state, pack_size, budget
        self.total, self.progress = total, progress
        self.known: set[bytes] = set()
        self.counts = {"chunks": 0, "unique": 0, "unique_bytes": 0, "stored": 0}
        self.done = 0
        self.volume = self._new_volume()

    def _new_volume(self) -> _Volume:
        number = len(self.state.volumes) + 1
        path = self.state.staging / volume_name(number)
        path.mkdir()
        volume = _Volume(number, path, PackWriter(path, self.pack_size),
                         first_ordinal=len(self.known))
        self.state.volumes.append(volume)
        return volume

    def consume(self, span: Span, result: Work, chunks: list[ChunkRef]) -> None:
        digest, stored, compressed = result
        chunks.append(ChunkRef(digest.hex(), span.length, span.offset))
        self.counts["chunks"] += 1
        # A worker returns no bytes only for a digest already in ``known``: a duplicate.
        if digest not in self.known:
            volume = self.volume
            if (self.budget is not None and volume.entries
                    and volume.writer.bytes_written + len(stored) > self.budget):
                volume.writer.close()
                volume = self.volume = self._new_volume()
            volume.writer.append(digest, stored, compressed)
            volume.entries += 1
            self.known.add(digest)
            self.counts["unique"] += 1
            self.counts["unique_bytes"] += span.length
            self.counts["stored"] += len(stored)
        self.done += span.length
        if self.progress is not None:
            self.progress(self.done, self.total)


def _write_packs(recipe: Recipe, planned: list[list[PlannedFile]], state: _State,
                 pack_size: int, budget: int | None, total: int, progress: Progress | None,
                 workers: int | None, level: int) -> tuple[list[ModelEntry], dict[str, int]]:
    workers = workers or max(2, os.cpu_count() or 2)
    in_flight = 2 * workers
    packer = _Packer(state, pack_size, budget, total, progress)
    models: list[ModelEntry] = []
    # The upstream sha256 runs on its own thread (hashlib releases the GIL), in file order.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bundle-build") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-sha256") as sha_pool:
        for spec, files in zip(recipe.models, planned, strict=True):
            entries: list[FileEntry] = []
            sources: list[SourceRecord] = []
            for planned_file in files:
                chunks: list[ChunkRef] = []
                pending: deque[tuple[Span, MappedRange, Future[Work], Future[None]]] = deque()
                sha = hashlib.sha256()
                path = planned_file.source.local_path

                def settle(item: tuple[Span, MappedRange, Future[Work], Future[None]],
                           chunks: list[ChunkRef] = chunks) -> None:
                    span_done, mapped, work, hashed = item
                    try:
                        hashed.result()
                        packer.consume(span_done, work.result(), chunks)
                    finally:
                        mapped.close()

                try:
                    handle = path.open("rb")
                except OSError as e:
                    raise RecipeError(f"cannot read {path}: {e}") from e
                try:
                    # Chunks are mapped, not read: no copy, and the same pages feed BLAKE3,
                    # zstd, sha256 and (for raw chunks) the pack write.
                    for span in planned_file.spans:
                        try:
                            mapped = MappedRange(handle.fileno(), span.offset, span.length)
                        except TruncatedError as e:
                            raise TruncatedError(f"{path} shrank while it was being read",
                                                 file=str(path), offset=span.offset) from e
                        pending.append((
                            span, mapped,
                            pool.submit(digest_and_compress, mapped.view, level,
                                        packer.known),
                            sha_pool.submit(sha.update, mapped.view),
                        ))
                        while len(pending) > in_flight:
                            settle(pending.popleft())
                    while pending:
                        settle(pending.popleft())
                    if os.fstat(handle.fileno()).st_size != planned_file.size:
                        raise RecipeError(f"{path} changed size while it was being read")
                    upstream = planned_file.source.upstream_sha256
                    if upstream is not None and sha.hexdigest() != upstream:
                        raise IntegrityError(
                            f"{planned_file.source.label}: the bytes read do not match the "
                            f"upstream digest (sha256 {sha.hexdigest()})", file=str(path))
                finally:
                    for _, mapped, work, hashed in pending:  # only after a failure
                        for future in (work, hashed):
                            future.cancel()
                            with contextlib.suppress(Exception):
                                future.exception()  # waits for a running one to let go
                        mapped.close()
                    handle.close()
                root = merkle_root([bytes.fromhex(c.digest) for c in chunks]).hex()
                dest = planned_file.source.dest
                entries.append(FileEntry(dest, planned_file.size, root, tuple(chunks)))
                sources.append(SourceRecord(dest, planned_file.source.label, sha.hexdigest()))
            gguf = next((f.gguf for f in files if f.gguf is not None), None)
            models.append(ModelEntry(
                name=spec.name, version=spec.version, license=spec.license,
                provenance=Provenance(builder=f"appliance {__version__}",
                                      sources=tuple(sources)),
                gguf=gguf, files=tuple(entries),
            ))
    packer.volume.writer.close()
    return models, packer.counts


def _finish(state: _State, data: bytes, signatures: Sequence[Signature],
            chain: Sequence[tuple[SignedRoot, bytes]], total_unique: int, *,
            split: bool) -> list[Path]:
    """Indexes and trust chain into staging, move into place, then signatures, manifest."""
    digest = blake3.blake3(data).digest()
    starts = tuple(v.first_ordinal for v in state.volumes)
    for volume in state.volumes:
        index = VolumeIndex(
            volume=volume.number, volume_count=len(state.volumes), total_chunks=total_unique,
            manifest_hash=digest, volume_starts=starts,
            pack_sizes=tuple(volume.writer.pack_sizes), entries=tuple(volume.writer.entries),
        )
        fsutil.write_atomic(volume.path / INDEX_NAME, encode_index(index), sync_dir=False)
        trust_dir = volume.path / TRUST_DIR
        trust_dir.mkdir()
        for signed, raw in chain:
            fsutil.write_atomic(trust_dir / root_file_name(signed.root.version), raw,
                                sync_dir=False)
        (volume.path / SIGNATURES_DIR).mkdir()
        fsutil.fsync_dir(volume.path, strict=False)
    finals: list[Path] = []
    for volume in state.volumes:
        if split:
            target = state.out_dir / volume_name(volume.number)
            os.rename(volume.path, target)
            state.moved.append(target)
        else:
            target = state.out_dir
            for child in sorted(volume.path.iterdir()):
                os.rename(child, target / child.name)
                state.moved.append(target / child.name)
        finals.append(target)
    fsutil.fsync_dir(state.out_dir, strict=False)
    for target in finals:
        for sig in signatures:
            fsutil.write_atomic(target / SIGNATURES_DIR / f"{sig.key_id}{SIGNATURE_SUFFIX}",
                                sig.to_bytes(), sync_dir=False)
        fsutil.fsync_dir(target / SIGNATURES_DIR, strict=False)
    # The manifest goes last: until it exists, no reader treats a volume as a bundle.
    for target in finals:
        fsutil.write_atomic(target / MANIFEST_NAME, data, sync_dir=False)
        state.moved.append(target / MANIFEST_NAME)
        fsutil.fsync_dir(target, strict=False)
    shutil.rmtree(state.staging, ignore_errors=True)
    return finals


def _cleanup(state: _State) -> None:
    for volume in state.volumes:
        volume.writer.abort()
    for path in reversed(state.moved):
        with contextlib.suppress(OSError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    shutil.rmtree(state.staging, ignore_errors=True)
    if state.created_out:
        with contextlib.suppress(OSError):
            state.out_dir.rmdir()
