"""What the TUI screens show, computed from the library API; no widgets and no Textual here.

Each screen's worker thread calls one function of this module and hands the result (a frozen
view dataclass) to the screen, which only lays it out. Everything below goes through the same
library calls as the CLI: ``appliance.bundle.reader`` (open, authenticate, verify media),
``appliance.store`` (trust state, audit log, models, scrub) and their error classes.

Long jobs take a ``progress`` callback and a ``cancelled`` predicate; ``cancellable`` joins
them so the library's own progress callback stops the job (``Cancelled``) at its next report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.bundle.media import MANIFEST_NAME, TRUST_DIR, root_file_name
from appliance.bundle.parity_rebuild import verify_media_with_parity
from appliance.bundle.reader import Media, open_media
from appliance.bundle.verify import VerifyReport
from appliance.errors import ApplianceError, AuditChainError, NoTrustRootError, UsageError
from appliance.format.manifest import Manifest
from appliance.format.signing import fingerprint_words
from appliance.format.trust import TrustRoot
from appliance.store import audit, removal, scrub, trust_state, trust_summary
from appliance.store.layout import human_bytes
from appliance.store.records import ModelRecord, list_models

Progress = Callable[[int, int], None]

# Where removable media are mounted on common Linux desktops and servers.
DEFAULT_SCAN_ROOTS = (Path("/media"), Path("/run/media"), Path("/mnt"))
_SCAN_DEPTH = 3


class Cancelled(Exception):
    """The operator cancelled the running job (raised from its progress callback)."""


def cancellable(progress: Progress | None, cancelled: Callable[[], bool]) -> Progress:
    """A progress callback that reports, then raises ``Cancelled`` once ``cancelled()``."""

    def report(done: int, total: int) -> None:
        if cancelled():
            raise Cancelled("cancelled by the operator")
        if progress is not None:
            progress(done, total)

    return report


def size(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


# --- trust -------------------------------------------------------------------------------


TrustView = trust_summary.TrustSummary  # the same summary `appliance trust show` prints


def trust_view(store_dir: Path, now: datetime) -> TrustView | None:
    """The root in force with its keys, every installed version and the channels; None if
    the store trusts nothing yet."""
    return trust_summary.store_summary(store_dir, now)


def install_root(store_dir: Path, root_files: Sequence[Path], fingerprint: str,
                 now: datetime) -> TrustRoot:
    """Install root files as ``appliance trust install`` does: the first root by the paper
    fingerprint on a fresh store, then every newer file walked as a rotation chain."""
    roots = [trust_state.read_root_file(path) for path in root_files]
    return trust_state.install_roots(store_dir, roots, fingerprint, now).root


def override_reason(typed: str | None) -> str | None:
    """The reason typed for an expiry override, or None when the library's rule
    (``trust_state.require_override_reason``) would not accept it."""
    try:
        trust_state.require_override_reason(True, typed)
    except UsageError:
        return None
    return (typed or "").strip()


# --- audit -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditView:
    records: tuple[audit.AuditRecord, ...]  # newest first
    chain_ok: bool
    chain_problem: str | None


def audit_view(store_dir: Path, limit: int = 1000) -> AuditView:
    """The log newest first (at most ``limit``) and the result of the chain check."""
    problem = None
    try:
        audit.verify(store_dir)
    except AuditChainError as e:
        problem = str(e)
    rows = list(audit.records(store_dir))
    return AuditView(records=tuple(reversed(rows[-limit:])), chain_ok=problem is None,
                     chain_problem=problem)


def describe_record(record: audit.AuditRecord) -> str:
    """One line of an audit record's details, most telling fields first."""
    details = dict(record.details)
    first = [k for k in ("action", "model", "models", "channel", "sequence", "error",
                         "reason", "message") if k in details]
    rest = sorted(k for k in details if k not in first)
    return ", ".join(f"{k}={_short(details[k])}" for k in (*first, *rest))


def _short(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- media -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaCandidate:
    """A directory that holds a bundle (one volume, or a media dir with ``vol-NNN``)."""

    path: Path
    volumes: tuple[str, ...]
    volume_count: int
    channel: str
    sequence: int
    models: tuple[str, ...]
    total_bytes: int
    problem: str | None = None  # unreadable: why
    root_files: tuple[Path, ...] = ()  # trust-root files it carries, oldest first


def _looks_like_bundle(path: Path) -> bool:
    if (path / MANIFEST_NAME).is_file():
        return True
    try:
        return any((p / MANIFEST_NAME).is_file() for p in path.glob("vol-*"))
    except OSError:
        return False


def _walk(root: Path, depth: int) -> Iterable[Path]:
    try:
        if _looks_like_bundle(root):
            yield root
            return
        if depth == 0:
            return
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        yield from _walk(Path(entry.path), depth - 1)


def describe_media(path: Path) -> MediaCandidate:
    """What a bundle directory claims (unverified: shown before any trust decision)."""
    try:
        media = open_media([path])
        manifest = media.parse_unverified()
    except ApplianceError as e:
        return MediaCandidate(path, (), 0, "?", 0, (), 0, problem=f"{type(e).__name__}: {e}")
    return MediaCandidate(
        path=path, volumes=tuple(media.volumes_present), volume_count=media.volume_count,
        channel=manifest.channel, sequence=manifest.sequence,
        models=tuple(f"{m.name}:{m.version}" for m in manifest.models),
        total_bytes=manifest.total_bytes, root_files=carried_root_files(media),
    )


def scan_media(roots: Sequence[Path], extra: Sequence[Path] = ()) -> list[MediaCandidate]:
    """Bundles under the mount roots (a few levels deep) plus the paths the operator gave."""
    seen: dict[Path, None] = {}
    for path in extra:
        if path.is_dir():
            seen.setdefault(path, None)
    for root in roots:
        for found in _walk(root, _SCAN_DEPTH):
            seen.setdefault(found, None)
    return [describe_media(p) for p in seen]


# --- inspect and verify ------------------------------------------------------------------


@dataclass(frozen=True)
class SignerView:
    key_id: str
    label: str
    words: str


@dataclass(frozen=True)
class InspectView:
    """A bundle after authentication against the store's trust root, or, on a host that
    trusts no root yet, what it claims (``verified`` False: shown as UNVERIFIED, signers
    named by the roots carried on the media, as ``appliance bundle inspect`` does)."""

    manifest: Manifest
    manifest_hash: str
    verified: bool
    signers: tuple[SignerView, ...]
    volumes_present: tuple[str, ...]
    volumes_missing: tuple[str, ...]
    volume_sizes: tuple[tuple[str, int], ...]  # bytes of packs per present volume
    trust_from: int  # installed root version (0: none)
    trust_to: int  # root version the bundle's chain reaches (an update when higher)
    channel_seen: tuple[int, str] | None  # the store's high-water mark for this channel
    expired: bool
    root_files: tuple[Path, ...] = ()  # the trust-root files carried on the first volume

    @property
    def rollback(self) -> str | None:
        """Why the store would refuse this sequence, or None."""
        seen = self.channel_seen
        m = self.manifest
        if seen is None or m.sequence > seen[0]:
            return None
        if m.sequence == seen[0] and seen[1] == self.manifest_hash:
            return None
        return (f"channel {m.channel} is at sequence {seen[0]} on this host; this bundle is "
                f"#{m.sequence}")


def _volume_sizes(media: Media) -> tuple[tuple[str, int], ...]:
    return tuple((v.name, sum(v.index.pack_sizes)) for v in media.volumes)


def carried_root_files(media: Media) -> tuple[Path, ...]:
    """The trust-root files on the media's first volume present, oldest first."""
    if not media.volumes:
        return ()
    volume = media.volumes[0]
    return tuple(volume.path / TRUST_DIR / root_file_name(s.root.version)
                 for s in sorted(volume.chain, key=lambda s: s.root.version))


def _claimed_signers(media: Media) -> tuple[SignerView, ...]:
    """Each signature's key as the newest carried root names it (nothing checked)."""
    roots = sorted((s.root for s in media.chain), key=lambda r: r.version, reverse=True)
    out = []
    for kid in sorted({sig.key_id for sig in media.signatures}):
        root = next((r for r in roots if kid in r.keys), None)
        if root is None:
            out.append(SignerView(kid, f"{kid} (in no carried root)", "-"))
        else:
            out.append(SignerView(kid, root.key_label(kid),
                                  fingerprint_words(root.keys[kid].public)))
    return tuple(out)


def inspect_media(store_dir: Path, paths: Sequence[Path], now: datetime, *,
                  allow_expired: bool = False) -> InspectView:
    """Open and authenticate (signatures, chain, scope, expiry); no chunk is read. Without
    an installed root nothing can be authenticated: the claims are shown, unverified."""
    root = trust_state.installed_root(store_dir)
    media = open_media(list(paths))
    if root is None:
        chain = [s.root.version for s in media.chain]
        return _view(media, media.parse_unverified(), verified=False,
                     signers=_claimed_signers(media), trust=(0, max(chain, default=0)),
                     channel_seen=None, expired=False)
    bundle = media.authenticate(root, now, allow_expired=allow_expired)
    signers = tuple(
        SignerView(kid, bundle.root.key_label(kid),
                   fingerprint_words(bundle.root.keys[kid].public))
        for kid in sorted(bundle.signers) if kid in bundle.root.keys
    )
    return _view(media, bundle.manifest, verified=True, signers=signers,
                 trust=(root.version, bundle.root.version),
                 channel_seen=trust_state.channel_state(store_dir, bundle.manifest.channel),
                 expired=bundle.expired_override)


def _view(media: Media, manifest: Manifest, *, verified: bool,
          signers: tuple[SignerView, ...], trust: tuple[int, int],
          channel_seen: tuple[int, str] | None, expired: bool) -> InspectView:
    return InspectView(
        manifest=manifest, manifest_hash=media.manifest_hash, verified=verified,
        signers=signers, volumes_present=tuple(media.volumes_present),
        volumes_missing=tuple(media.volumes_missing), volume_sizes=_volume_sizes(media),
        trust_from=trust[0], trust_to=trust[1], channel_seen=channel_seen, expired=expired,
        root_files=carried_root_files(media))


def verify(store_dir: Path, paths: Sequence[Path], now: datetime, *,
           progress: Progress | None = None, allow_expired: bool = False) -> VerifyReport:
    """Every byte of the volumes given, against the store's trust root."""
    root = trust_state.require_root(store_dir)
    return verify_media_with_parity(list(paths), root, now, progress=progress,
                                    allow_expired=allow_expired)


def per_volume(done: int, sizes: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Split overall bytes done (volumes are read in order) into (volume, done, total)."""
    out = []
    left = done
    for name, total in sizes:
        part = max(0, min(left, total))
        out.append((name, part, total))
        left -= total
    return out


# --- models ------------------------------------------------------------------------------


def models(store_dir: Path) -> list[ModelRecord]:
    return list_models(store_dir)


def remove_model(store_dir: Path, ref: str, now: datetime) -> ModelRecord:
    return removal.remove_model(store_dir, ref, now)


def verify_store(store_dir: Path, *, progress: Progress | None = None) -> scrub.VerifyReport:
    return scrub.verify_store(store_dir, progress=progress)


@dataclass(frozen=True)
class StoreStatus:
    """Whether the store can be used at all (shown in the header line)."""

    store_dir: Path
    root_version: int | None
    model_count: int
    problems: tuple[str, ...] = field(default=())


def store_status(store_dir: Path) -> StoreStatus:
    problems = []
    root = None
    count = 0
    try:
        installed = trust_state.installed_root(store_dir)
        root = installed.version if installed else None
        count = len(list_models(store_dir))
    except ApplianceError as e:
        problems.append(str(e))
    if root is None and not problems:
        problems.append(str(NoTrustRootError("no trust root installed")))
    return StoreStatus(store_dir, root, count, tuple(problems))
