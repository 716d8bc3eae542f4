"""Reading parity volumes: rebuilding missing or damaged data volumes, and checking parity.

The code and its layout are described in ``appliance.bundle.parity`` (which writes the parity
volumes at build time) and docs/FORMAT.md, "Parity volumes". Here is the reader's side: data
volumes are rebuilt into a scratch directory and then read like any volume, so every chunk of a
rebuilt volume is still checked against the signed manifest; a parity file that does not hash
to its signed value is refused (``IntegrityError``) after a rebuild that used it and before the
rebuilt volume is used. Public API:

- ``split_volumes(paths)``: data volume dirs and parity volume dirs among the paths given;
- ``restore(paths, root, now, scratch, *, rebuild=())``: authenticate, then rebuild the data
  volumes that are missing (or named in ``rebuild``) into ``scratch``;
- ``check_parity_volumes(...)``: every byte of the parity volumes against the manifest;
- ``import_media_with_parity`` / ``verify_media_with_parity``: drop-in for
  ``importer.import_media`` / ``verify.verify_media`` that rebuild when a volume is missing
  or a chunk read from one fails its check, and say which volumes were rebuilt.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import blake3

from appliance import fsutil
from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.bundle.media import (
    INDEX_NAME,
    MANIFEST_NAME,
    PACKS_DIR,
    SIGNATURE_SUFFIX,
    SIGNATURES_DIR,
    TRUST_DIR,
    pack_name,
    parse_index_head,
    root_file_name,
    volume_name,
)
from appliance.bundle.parity_layout import (
    BLOCK_BYTES,
    INDEXES_DIR,
    PARITY_NAME,
    ParityHeader,
    StreamReader,
    StreamWriter,
    header_size,
    is_parity_volume,
    parse_parity_header,
)
from appliance.bundle.reader import open_media
from appliance.bundle.verify import VerifyReport, verify_media
from appliance.errors import (
    FormatError,
    IntegrityError,
    LimitExceededError,
    MediaError,
    MissingVolumeError,
    TruncatedError,
    UsageError,
)
from appliance.format.parity_field import MAX_SHARES, ParitySection, ParityVolume
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot, TrustRoot, parse_signed_root
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.store import trust_state
from appliance.store.location import check_store_path

if TYPE_CHECKING:  # the importer (store, ingest, staging) only where an import runs
    from appliance.importer import ImportResult

# ---------------------------------------------------------------------------------------------
# Reading: which volumes are there, and rebuilding the ones that are not


def split_volumes(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(data volume dirs, parity volume dirs) among ``paths`` (volumes or media dirs)."""
    data: list[Path] = []
    parity: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory" if path.exists()
                             else f"{path} does not exist")
        if is_parity_volume(path):
            parity.append(path)
        elif os.path.lexists(path / MANIFEST_NAME):
            data.append(path)
        else:
            data += sorted(p for p in path.glob("vol-*")
                           if p.is_dir() and os.path.lexists(p / MANIFEST_NAME))
            parity += sorted(p for p in path.glob("par-*") if p.is_dir() and is_parity_volume(p))
            if not data and not parity:
                raise MediaError(f"{path} holds no bundle: no {MANIFEST_NAME} in it or in any "
                                 "vol-NNN folder")
    return data, parity


@dataclass(frozen=True)
class Restored:
    """The data volume dirs to read (rebuilt ones in scratch) and what was rebuilt."""

    dirs: tuple[Path, ...]
    rebuilt: tuple[str, ...]
    bundle: AuthenticatedBundle | None  # None when no parity volume was given
    parity_dirs: tuple[Path, ...]


def _read_claims(volume: Path, limits: Limits
                 ) -> tuple[bytes, tuple[Signature, ...], list[SignedRoot]]:
    """Manifest bytes, signatures and carried roots of a parity volume, with the media caps."""
    manifest = fsutil.read_capped(volume / MANIFEST_NAME, limits.max_manifest_bytes,
                                  f"manifest of {volume}")
    found = []
    for folder, suffix, cap, count in (
            (SIGNATURES_DIR, SIGNATURE_SUFFIX, limits.max_signature_bytes, limits.max_signatures),
            (TRUST_DIR, ".yaml", limits.max_trust_root_bytes, limits.max_trust_chain_length)):
        try:
            names = sorted(n for n in os.listdir(volume / folder)
                           if n.endswith(suffix) and not n.startswith("."))
        except FileNotFoundError:
            names = []
        if len(names) > count:
            raise LimitExceededError(f"{volume / folder} holds {len(names)} files, over the cap")
        found.append([fsutil.read_capped(volume / folder / n, cap, f"{folder}/{n}")
                      for n in names])
    signatures = tuple(Signature.from_bytes(data, limits) for data in found[0])
    roots = sorted((parse_signed_root(data, limits) for data in found[1]),
                   key=lambda r: r.root.version)
    return manifest, signatures, roots


def _authenticate(data_dirs: Sequence[Path], parity_dirs: Sequence[Path], root: TrustRoot,
                  now: datetime, allow_expired: bool, limits: Limits
                  ) -> tuple[AuthenticatedBundle, dict[int, tuple[Path, tuple[int, ...]]]]:
    """The bundle, authenticated, and the data volumes that passed the reader's checks (by
    number, with pack sizes). A data volume whose index is unreadable or disagrees with the
    signed manifest counts as missing, to be rebuilt; a signature or trust failure stops.
    With no data volume left, a parity volume's own manifest, signatures and roots are used."""
    bundle: AuthenticatedBundle | None = None
    good: dict[int, tuple[Path, tuple[int, ...]]] = {}
    for d in data_dirs:
        try:
            media = open_media([d], limits)
            this = media.authenticate(root, now, allow_expired=allow_expired)
        except (FormatError, IntegrityError, MediaError):
            continue
        if bundle is not None and this.manifest_hash != bundle.manifest_hash:
            raise FormatError(f"{d} belongs to another bundle than the other volumes given")
        bundle = this
        (volume,) = media.volumes
        good.setdefault(volume.index.volume, (d, volume.index.pack_sizes))
    if bundle is None:
        manifest, signatures, chain = _read_claims(parity_dirs[0], limits)
        bundle = authenticate_manifest(manifest, signatures, chain, root, now,
                                       allow_expired=allow_expired, limits=limits)
    for p in parity_dirs:
        data = fsutil.read_capped(p / MANIFEST_NAME, limits.max_manifest_bytes,
                                  f"manifest of {p}")
        if data != bundle.manifest_bytes:
            raise FormatError(f"{p} carries a different manifest than the data volumes")
    return bundle, good


def _parity_header(path: Path, section: ParitySection) -> ParityHeader:
    where = f"parity volume {path}"
    fd = fsutil.open_regular(path / PARITY_NAME, where)
    try:
        size = os.fstat(fd).st_size
        head = fsutil.pread_exact(fd, min(size, header_size(MAX_SHARES)), 0)
    finally:
        os.close(fd)
    header = parse_parity_header(head, where)
    if (header.data_volumes, header.block_size, header.stripes, header.total_shares) != (
            section.data_volumes, section.block_size, section.stripes, section.total_shares):
        raise FormatError(f"{where}: its header disagrees with the signed manifest")
    signed = section.volumes[header.share - section.data_volumes]
    if size != signed.size:
        raise IntegrityError(f"{PARITY_NAME} is {size} bytes, the manifest says {signed.size}",
                             volume=path.name)
    return header


def restore(paths: Sequence[Path], root: TrustRoot, now: datetime, scratch: Path, *,
            rebuild: Sequence[str] = (), allow_expired: bool = False,
            limits: Limits = DEFAULT_LIMITS) -> Restored:
    """Authenticate the bundle, then rebuild into ``scratch`` every data volume that is
    missing or named in ``rebuild`` (``MissingVolumeError`` when too few volumes remain)."""
    data_dirs, parity_dirs = split_volumes(paths)
    if not parity_dirs:
        return Restored(tuple(data_dirs), (), None, ())
    bundle, present = _authenticate(data_dirs, parity_dirs, root, now, allow_expired, limits)
    section = bundle.manifest.parity
    if section is None:
        raise FormatError("parity volumes were given, but the signed manifest has no parity")
    k = section.data_volumes
    wanted = sorted({n for n in range(1, k + 1) if n not in present}
                    | {int(name.removeprefix("vol-")) for name in rebuild})
    keep = [present[n][0] for n in sorted(present) if n not in wanted]
    if not wanted:
        return Restored(tuple(keep), (), bundle, tuple(parity_dirs))
    shares: dict[int, Path] = {}
    for path in parity_dirs:
        shares.setdefault(_parity_header(path, section).share, path)
    usable = [n for n in sorted(present) if n not in wanted]
    if len(usable) + len(shares) < k:
        raise MissingVolumeError(
            f"{', '.join(volume_name(n) for n in wanted)} cannot be rebuilt: "
            f"{k - len(usable) - len(shares)} more volume(s) of this bundle are needed")
    rebuilt = _rebuild(bundle, section, {n: present[n] for n in usable}, shares, wanted,
                       scratch, limits)
    dirs = sorted([*keep, *rebuilt], key=lambda p: p.name)
    return Restored(tuple(dirs), tuple(volume_name(n) for n in wanted), bundle,
                    tuple(parity_dirs))


def _read_index_copy(parity: Path, number: int, bundle: AuthenticatedBundle,
                     limits: Limits) -> tuple[bytes, tuple[int, ...]]:
    where = f"index copy of {volume_name(number)} on {parity.name}"
    data = fsutil.read_capped(parity / INDEXES_DIR / f"{volume_name(number)}.bin",
                              limits.max_volume_index_bytes, where)
    head = parse_index_head(data, len(data), limits, where=where)
    if head.volume != number or head.manifest_hash.hex() != bundle.manifest_hash:
        raise FormatError(f"{where} belongs to another volume or manifest")
    return data, head.pack_sizes


def _rebuild(bundle: AuthenticatedBundle, section: ParitySection,
             usable: dict[int, tuple[Path, tuple[int, ...]]], shares: dict[int, Path],
             wanted: Sequence[int], scratch: Path, limits: Limits) -> list[Path]:
    k, block = section.data_volumes, section.block_size
    chosen_data = sorted(usable)[:k]
    chosen_parity = sorted(shares)[:k - len(chosen_data)]
    any_parity = shares[chosen_parity[0]] if chosen_parity else next(iter(shares.values()))
    targets: dict[int, tuple[Path, StreamWriter, int]] = {}
    readers: list[StreamReader] = []
    parity_files: list[tuple[BinaryIO, Any, ParityVolume, str]] = []
    try:
        for n in wanted:
            index, pack_sizes = _read_index_copy(any_parity, n, bundle, limits)
            target = scratch / volume_name(n)
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            fsutil.write_atomic(target / INDEX_NAME, index, sync_dir=False)
            (target / SIGNATURES_DIR).mkdir()
            for sig in bundle.signatures:
                (target / SIGNATURES_DIR / f"{sig.key_id}{SIGNATURE_SUFFIX}").write_bytes(
                    sig.to_bytes())
            (target / TRUST_DIR).mkdir()
            for signed in bundle.chain:
                (target / TRUST_DIR / root_file_name(signed.root.version)).write_bytes(
                    signed.to_bytes())
            targets[n] = (target, StreamWriter(target, pack_sizes), sum(pack_sizes))
        for n in chosen_data:
            path, sizes = usable[n]
            readers.append(StreamReader(
                [(path / PACKS_DIR / pack_name(i), s) for i, s in enumerate(sizes, start=1)],
                volume_name(n)))
        for share in chosen_parity:
            path = shares[share]
            handle: BinaryIO = (path / PARITY_NAME).open("rb")
            parity_files.append((handle, blake3.blake3(handle.read(header_size(k))),
                                 section.volumes[share - k], path.name))
        import zfec  # here, not at the top: verify and import of media without parity

        decoder = zfec.Decoder(k, section.total_shares)
        numbers = tuple([n - 1 for n in chosen_data] + chosen_parity)
        for _ in range(section.stripes):
            blocks = [r.read(block) for r in readers]
            for handle, h, _, name in parity_files:
                data = handle.read(block)
                if len(data) != block:
                    raise TruncatedError(f"{PARITY_NAME} ends early", volume=name)
                h.update(data)
                blocks.append(data)
            primary = decoder.decode(tuple(blocks), numbers)
            for n, (_, writer, _) in targets.items():
                writer.write(primary[n - 1])
        for _, h, expected, name in parity_files:
            if h.hexdigest() != expected.blake3:
                raise IntegrityError(f"{PARITY_NAME} does not match the signed manifest",
                                     volume=name)
        for target, writer, _ in targets.values():
            writer.close()
            # The manifest goes last, as on real media: a half-rebuilt volume is no volume.
            fsutil.write_atomic(target / MANIFEST_NAME, bundle.manifest_bytes, sync_dir=False)
    except BaseException:
        for target, writer, _ in targets.values():
            writer.close()
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        for r in readers:
            r.close()
        for handle, *_ in parity_files:
            handle.close()
    return [t for t, _, _ in targets.values()]


def check_parity_volumes(parity_dirs: Sequence[Path], section: ParitySection,
                         data_dirs: Sequence[Path], limits: Limits = DEFAULT_LIMITS) -> int:
    """Every byte of each parity volume against the signed manifest, and its index copies
    against the data volumes given. Returns the bytes read."""
    read = 0
    indexes = {}
    for d in data_dirs:
        data = fsutil.read_capped(d / INDEX_NAME, limits.max_volume_index_bytes, f"index of {d}")
        indexes[parse_index_head(data, len(data), limits).volume] = data
    for path in parity_dirs:
        header = _parity_header(path, section)
        signed = section.volumes[header.share - section.data_volumes]
        h = blake3.blake3()
        with (path / PARITY_NAME).open("rb") as f:
            while data := f.read(BLOCK_BYTES):
                h.update(data)
                read += len(data)
        if h.hexdigest() != signed.blake3:
            raise IntegrityError(f"{PARITY_NAME} does not match the signed manifest",
                                 volume=path.name)
        for number, index in indexes.items():
            copy = path / INDEXES_DIR / f"{volume_name(number)}.bin"
            if fsutil.read_capped(copy, limits.max_volume_index_bytes, str(copy)) != index:
                raise FormatError(f"{path.name}: its copy of the {volume_name(number)} index "
                                  "differs from the volume's own")
    return read


# ---------------------------------------------------------------------------------------------
# Import and verify that rebuild


def _with_rebuilds(paths: Sequence[Path], root: TrustRoot, now: datetime, scratch: Path,
                   allow_expired: bool, limits: Limits,
                   attempt: Callable[[Restored], Any]) -> tuple[Any, Restored]:
    """Run ``attempt`` on the restored volumes; when a chunk of a data volume fails its check,
    rebuild that volume from parity and run again (at most once per volume)."""
    damaged: list[str] = []
    while True:
        restored = restore(paths, root, now, scratch, rebuild=damaged,
                           allow_expired=allow_expired, limits=limits)
        try:
            return attempt(restored), restored
        except IntegrityError as e:
            section = restored.bundle.manifest.parity if restored.bundle else None
            if (section is None or e.volume is None or not e.volume.startswith("vol-")
                    or e.volume in restored.rebuilt or e.volume in damaged
                    or len(damaged) >= len(section.volumes)):
                raise
            damaged.append(e.volume)


def import_media_with_parity(store_dir: Path, volume_dirs: Sequence[Path], *, now: datetime,
                             **kwargs: Any) -> ImportResult:
    """``import_media`` that rebuilds missing or damaged volumes from parity volumes given
    (scratch space on the store's filesystem, removed afterwards)."""
    from appliance.importer import import_media

    check_store_path(store_dir)  # the store before the media, as ``import_media`` does
    _, parity_dirs = split_volumes(volume_dirs)
    if not parity_dirs:
        return import_media(store_dir, volume_dirs, now=now, **kwargs)
    started = time.perf_counter()
    root = trust_state.require_root(store_dir)
    limits = kwargs.get("limits", DEFAULT_LIMITS)
    with tempfile.TemporaryDirectory(prefix=".parity-rebuild-", dir=store_dir) as scratch:
        result, restored = _with_rebuilds(
            volume_dirs, root, now, Path(scratch), kwargs.get("allow_expired", False), limits,
            lambda r: import_media(store_dir, list(r.dirs), now=now, **kwargs))
    return dataclasses.replace(result, rebuilt=restored.rebuilt,
                               seconds=time.perf_counter() - started)


def verify_media_with_parity(volume_dirs: Sequence[Path], trusted_root: TrustRoot,
                             now: datetime, **kwargs: Any) -> VerifyReport:
    """``verify_media`` over the data volumes (rebuilt from parity where missing or damaged,
    in a temporary directory) plus every byte of the parity volumes given."""
    _, parity_dirs = split_volumes(volume_dirs)
    if not parity_dirs:
        return verify_media(volume_dirs, trusted_root, now, **kwargs)
    started = time.perf_counter()
    limits = kwargs.get("limits", DEFAULT_LIMITS)

    def attempt(restored: Restored) -> VerifyReport:
        report = verify_media(list(restored.dirs), trusted_root, now, **kwargs)
        section = report.bundle.manifest.parity
        assert section is not None  # restore() refused parity volumes without a section
        extra = check_parity_volumes(restored.parity_dirs, section, restored.dirs, limits)
        return dataclasses.replace(report, stored_bytes=report.stored_bytes + extra)

    with tempfile.TemporaryDirectory(prefix="appliance-parity-") as scratch:
        report, restored = _with_rebuilds(volume_dirs, trusted_root, now, Path(scratch),
                                          kwargs.get("allow_expired", False), limits, attempt)
    return dataclasses.replace(report, rebuilt=restored.rebuilt,
                               seconds=time.perf_counter() - started)  # rebuilds included

