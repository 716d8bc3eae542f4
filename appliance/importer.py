"""Import a signed bundle from removable media into the local store, resumably.

``import_media(store_dir, volume_dirs, *, now, ...) -> ImportResult`` does, in this order:

1. open the volumes given (small files only, with caps) and, holding the store's writer
   lock, AUTHENTICATE before any chunk is read: walk the carried trust chain from the
   installed root, check the signature threshold, parse, check publisher scopes, expiry
   (``allow_expired`` needs a ``reason``: audited as "override"), every volume index, and
   the channel's rollback rule; every pack must have the size its index says;
2. plan against the store (a model already stored with other bytes is refused) and check the
   free space the new staged files need (``DiskFullError`` says how much);
3. in ONE transaction: persist the newer trust roots reached, raise the channel's high-water
   mark (``RollbackError`` for an older sequence, or the same one with other bytes), record
   the manifest and its signatures (peers re-serve them) and the import;
4. write every chunk not yet durable into its staged file: from a verified local copy when
   the store already holds it (another version, another quant, a resumed run), else from
   whichever given volume stores it, in pack order; each chunk is checked against the
   signed digest before it is written; a file is published as soon as all its chunks are.

Chunks on volumes not given are left for a later run: the result lists the volumes still
needed and the import resumes where it stopped (also after SIGKILL, see
``appliance.store.staging``). Refusals are audited as "refusal"; every run that got past
authentication leaves an "import" record. The media is only ever opened for reading.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from appliance.bundle.reader import (
    AuthenticatedBundle,
    ChunkLocation,
    Media,
    open_media,
    read_chunk,
)
from appliance.errors import (
    ApplianceError,
    IntegrityError,
    MediaError,
    MissingVolumeError,
    NoTrustRootError,
    RefusalError,
    TruncatedError,
    UsageError,
)
from appliance.format.manifest import ChunkRef
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.store import layout, trust_state
from appliance.store.staging import DEFAULT_FLUSH_BYTES, StagedFile
from appliance.store.store import LocalChunk, ModelPlan, Store, read_local_copy

Progress = Callable[[int, int], None]
# Reader threads, and chunks read ahead of the writer (memory: at most this many chunks).
_READERS = 2
_READ_AHEAD = 4


@dataclass(frozen=True)
class ImportResult:
    manifest_hash: str
    channel: str
    sequence: int
    signers: tuple[str, ...]
    complete: bool  # every model of the bundle is published
    published: tuple[str, ...]  # name:version published by this run
    present: tuple[str, ...]  # already in the store before this run
    pending: tuple[str, ...]  # still incomplete: their chunks are on volumes not given
    volumes_used: tuple[str, ...]
    volumes_needed: tuple[str, ...]  # volumes to insert to finish the pending models
    total_bytes: int
    already_done_bytes: int  # durable in the store before this run
    media_bytes: int  # plain bytes read from the media by this run
    local_bytes: int  # plain bytes copied from chunks the store already held
    seconds: float
    expired_override: bool


@dataclass
class _Target:
    staged: StagedFile
    idx: int


@dataclass
class _Work:
    """One distinct chunk still needed, where to get it, and every place it goes."""

    ref: ChunkRef
    targets: list[_Target]
    local: list[LocalChunk] = field(default_factory=list)
    location: ChunkLocation | None = None
    missing_volume: str | None = None


@dataclass(frozen=True)
class _Fetched:
    data: bytes | None  # None: on no volume given
    local: bool


def import_media(
    store_dir: Path,
    volume_dirs: Sequence[Path],
    *,
    now: datetime,
    allow_expired: bool = False,
    reason: str | None = None,
    progress: Progress | None = None,
    limits: Limits = DEFAULT_LIMITS,
    flush_bytes: int = DEFAULT_FLUSH_BYTES,
) -> ImportResult:
    """Authenticate the bundle on ``volume_dirs`` and import what they hold into the store."""
    started = time.perf_counter()
    if allow_expired and not (reason or "").strip():
        raise UsageError("--allow-expired needs --reason TEXT: the audit log records why")
    media_names = [str(p) for p in volume_dirs]
    with (
        layout.writer_lock(store_dir, "import"),
        Store(store_dir, flush_bytes=flush_bytes) as store,
    ):
        try:
            media = open_media(volume_dirs, limits)
            root = trust_state.require_root(store_dir, store.conn)
            bundle = media.authenticate(root, now, allow_expired=allow_expired)
            trust_state.check_channel(store_dir, bundle, store.conn)
            _check_packs(media)
        except NoTrustRootError:
            raise
        except RefusalError as e:
            trust_state.audit_refusal(store_dir, "import", e, media=media_names)
            raise
        manifest = bundle.manifest
        plans = store.plan(manifest.models)
        layout.check_free_space(
            store_dir,
            sum(p.bytes_to_allocate for p in plans if p.action != "present"),
            f"importing {manifest.channel} #{manifest.sequence}",
        )
        trust_state.record_acceptance(store, bundle, now, allow_expired=allow_expired,
                                      reason=reason, action="import", media=media_names)
        run = _Run(store, media, bundle, plans, now, progress)
        try:
            run.import_models()
        except RefusalError as e:
            trust_state.audit_refusal(
                store_dir, "import", e, media=media_names, manifest=bundle.manifest_hash
            )
            raise
        result = run.result(time.perf_counter() - started)
        with store.transaction():
            store.audit(
                "import",
                {
                    "manifest": result.manifest_hash,
                    "channel": result.channel,
                    "sequence": result.sequence,
                    "status": "complete" if result.complete else "partial",
                    "published": list(result.published),
                    "pending": list(result.pending),
                    "volumes": list(result.volumes_used),
                    "volumes_needed": list(result.volumes_needed),
                    "media_bytes": result.media_bytes,
                    "local_bytes": result.local_bytes,
                    "user": trust_state.who(),
                },
                now,
            )
        if result.complete:
            store.finish_import(result.manifest_hash, now)
        return result


def _check_packs(media: Media) -> None:
    """Every pack of every volume given has the size its (checked) index says: a truncated or
    padded pack is refused before any chunk is read, not half-way through the copy."""
    for volume in media.volumes:
        for number, expected in enumerate(volume.index.pack_sizes, start=1):
            pack = volume.pack_path(number)
            try:
                actual = pack.stat().st_size
            except FileNotFoundError as e:
                raise TruncatedError(f"pack {pack.name} is missing", volume=volume.name) from e
            except OSError as e:
                raise MediaError(f"cannot read {pack}: {e}") from e
            if actual != expected:
                raise TruncatedError(
                    f"pack {pack.name} is {actual} bytes, its index says {expected}",
                    volume=volume.name,
                    offset=min(actual, expected),
                )


class _Run:
    """The chunk-moving part of one import run."""

    def __init__(
        self,
        store: Store,
        media: Media,
        bundle: AuthenticatedBundle,
        plans: list[ModelPlan],
        now: datetime,
        progress: Progress | None,
    ) -> None:
        self.store = store
        self.media = media
        self.bundle = bundle
        self.plans = plans
        self.now = now
        self.progress = progress
        self.total = bundle.manifest.total_bytes
        self.already = sum(p.bytes_done for p in plans)
        self.done = self.already
        self.media_bytes = 0
        self.local_bytes = 0
        self.published: list[str] = []
        self.pending: list[str] = []
        self.needed: set[str] = set()
        self.volume_paths = {v.name: v.path for v in media.volumes}

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)

    def import_models(self) -> None:
        staged: list[StagedFile] = []
        by_model: dict[str, list[StagedFile]] = {}
        for model, plan in zip(self.bundle.manifest.models, self.plans, strict=True):
            if plan.action == "present":
                continue
            model_id = self.store.begin_model(model, self.bundle.manifest_hash, self.now)
            if model_id is None:  # published meanwhile by a publish a crash had cut short
                continue
            files = self.store.stage_files(model_id, self.now)
            by_model[f"{model.name}:{model.version}"] = files
            staged.extend(files)
        # Files a crash left fully written (or just recovered) publish before anything else.
        self.done = self.already = sum(
            f.size if f.is_published else f.done_bytes() for fs in by_model.values() for f in fs
        ) + sum(p.size for p in self.plans if p.action == "present")
        self._report()
        try:
            for f in staged:
                f.open()  # preallocate every file now: a full disk shows up before copying
            self._copy_all(self._collect(staged))
            for ref, files in by_model.items():
                for f in files:
                    f.flush()
                    if not f.is_published and not f.pending():
                        f.publish(self.now)
                if all(f.is_published for f in files):
                    self.published.append(ref)
                else:
                    self.pending.append(ref)
        except BaseException:
            for f in staged:
                _close_quietly(f)
            raise
        for f in staged:
            f.close()

    def _collect(self, staged: list[StagedFile]) -> list[_Work]:
        """Distinct pending chunks: held locally first, then in volume/pack/offset order."""
        by_digest: dict[str, _Work] = {}
        for f in staged:
            for chunk in f.pending():
                item = by_digest.get(chunk.digest)
                if item is None:
                    ref = ChunkRef(chunk.digest, chunk.length, chunk.offset)
                    item = by_digest[chunk.digest] = _Work(ref, [])
                item.targets.append(_Target(f, chunk.idx))
        held = self.store.held_digests()
        local, remote = [], []
        for digest, item in by_digest.items():
            if digest in held:
                item.local = self.store.find_chunk(digest)
            if item.local:
                local.append(item)
                continue
            try:
                item.location = self.media.locations(digest)[0]
            except MissingVolumeError:
                item.missing_volume = self._holder(digest)
            remote.append(item)
        remote.sort(
            key=lambda w: (
                (w.location.volume, str(w.location.pack), w.location.offset)
                if w.location
                else ("~", "", 0)
            )
        )
        return local + remote

    def _holder(self, digest: str) -> str:
        return self.media.holder(digest) or "?"

    def _copy_all(self, work: list[_Work]) -> None:
        """Read and verify chunks in worker threads, a few ahead; write them here, in order.

        Reading, decompressing and hashing (which release the GIL) overlap with the writes and
        fsyncs of this thread; at most ``_READ_AHEAD`` chunks are in memory.
        """
        pending = iter(work)
        window: deque[tuple[_Work, Future[_Fetched]]] = deque()
        with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="import-read") as pool:
            try:
                for item in itertools.islice(pending, _READ_AHEAD):
                    window.append((item, pool.submit(self._fetch, item)))
                while window:
                    item, future = window.popleft()
                    fetched = future.result()
                    for following in itertools.islice(pending, 1):
                        window.append((following, pool.submit(self._fetch, following)))
                    self._write(item, fetched)
            except BaseException:
                for _, future in window:
                    future.cancel()
                raise

    def _fetch(self, item: _Work) -> _Fetched:
        """Runs in a reader thread: get the verified bytes (a local copy, else the media) and
        pwrite them; the index thread records them afterwards (``_write``)."""
        fetched = self._read(item)
        if fetched.data is not None:
            for target in item.targets:
                target.staged.pwrite_chunk(target.idx, fetched.data)
        return fetched

    def _read(self, item: _Work) -> _Fetched:
        for loc in item.local:
            try:
                data = read_local_copy(loc)
            except FileNotFoundError:
                continue  # renamed by a publish: the media copy serves as well
            if data is not None:
                return _Fetched(data, local=True)
        if item.location is None:
            try:  # held locally when planned, but that copy went bad: try the media
                item.location = self.media.locations(item.ref.digest)[0]
            except MissingVolumeError:
                item.missing_volume = item.missing_volume or self._holder(item.ref.digest)
                return _Fetched(None, local=False)
        return _Fetched(self._read_media(item), local=False)

    def _write(self, item: _Work, fetched: _Fetched) -> None:
        data = fetched.data
        if data is None:
            self.needed.add(item.missing_volume or "?")
            return
        if fetched.local:
            self.local_bytes += len(data) * len(item.targets)
        else:
            self.media_bytes += len(data)
            self.local_bytes += len(data) * (len(item.targets) - 1)
        for target in item.targets:
            target.staged.record_chunk(target.idx, data)
            self.done += len(data)
        self._report()

    def _read_media(self, item: _Work) -> bytes:
        assert item.location is not None
        location = item.location
        label = item.targets[0].staged.label
        try:
            return read_chunk(location, item.ref, self.media.limits, file=label)
        except (IntegrityError, MediaError) as e:
            volume_dir = self.volume_paths.get(location.volume)
            if volume_dir is not None and not (volume_dir / "manifest.yaml").exists():
                raise MissingVolumeError(
                    f"{location.volume} ({volume_dir}) went away during the import; what was "
                    "written so far is kept: put it back and run the same import again"
                ) from e
            raise

    def result(self, seconds: float) -> ImportResult:
        manifest = self.bundle.manifest
        present = tuple(f"{p.name}:{p.version}" for p in self.plans if p.action == "present")
        return ImportResult(
            manifest_hash=self.bundle.manifest_hash,
            channel=manifest.channel,
            sequence=manifest.sequence,
            signers=tuple(sorted(self.bundle.signers)),
            complete=not self.pending,
            published=tuple(self.published),
            present=present,
            pending=tuple(self.pending),
            volumes_used=tuple(v.name for v in self.media.volumes),
            volumes_needed=tuple(sorted(self.needed)),
            total_bytes=self.total,
            already_done_bytes=self.already,
            media_bytes=self.media_bytes,
            local_bytes=self.local_bytes,
            seconds=seconds,
            expired_override=self.bundle.expired_override,
        )


def _close_quietly(staged: StagedFile) -> None:
    """Keep what is durable after a failure; a failing flush must not hide the first error."""
    try:
        staged.close()
    except ApplianceError:
        staged.abort()
