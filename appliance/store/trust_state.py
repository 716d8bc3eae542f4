"""The store's trust state: the installed chain of trust roots and each channel's high-water mark.

Tables (appliance/store/db.py): ``trust_roots`` holds one row per accepted root version with
its fingerprint and the exact root file bytes, oldest first, so the newest row is the root in
force; ``channels`` holds, per channel, the highest sequence accepted and the hash of that
manifest. The first root enters only with the operator's fingerprint; later ones only through
``appliance.format.trust.walk_chain``; ``install_roots`` is the one way an operator installs
root files (the CLI and the TUI call it). Installs, updates, refusals and overrides go to the
audit log with the operating system user (``who``). ``require_override_reason`` is the rule
that an --allow-expired override needs a reason. ``record_acceptance`` is where an import and
a peer pull accept an authenticated bundle: roots, high-water mark and manifest in one
transaction.
"""

from __future__ import annotations

import functools
import getpass
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.authenticate import AuthenticatedBundle
from appliance.errors import (
    ApplianceError,
    FingerprintMismatchError,
    NoTrustRootError,
    RefusalError,
    RotationError,
    StoreError,
    TrustError,
    UsageError,
)
from appliance.format.fields import format_timestamp
from appliance.format.freshness import check_rollback
from appliance.format.trust import (
    SignedRoot,
    TrustRoot,
    check_fingerprint,
    normalize_fingerprint,
    parse_signed_root,
    verify_self_signed,
    walk_chain,
)
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.store import audit
from appliance.store.db import connect
from appliance.store.specs import BundleOrigin

if TYPE_CHECKING:  # the store's write side only where a bundle is accepted into it
    from appliance.store.store import Store


def who() -> str:
    """The operating system user, for audit records ("who" of an override)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


@contextmanager
def _transaction(store_dir: Path, conn: sqlite3.Connection | None) -> Iterator[sqlite3.Connection]:
    """Own IMMEDIATE transaction, or the caller's ``conn`` (already in its transaction)."""
    if conn is not None:
        yield conn
        return
    db = connect(store_dir)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield db
        db.execute("COMMIT")
        audit.sync_head(store_dir, db)  # the head anchors the log: audit verify needs it
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def _sql_error(store_dir: Path, e: sqlite3.Error) -> StoreError:
    return StoreError(f"trust state in {store_dir} is unusable: {e}")


@contextmanager
def _reading(store_dir: Path, conn: sqlite3.Connection | None = None
             ) -> Iterator[sqlite3.Connection]:
    """The caller's ``conn``, or a connection of our own closed afterwards; a sqlite error
    becomes a StoreError."""
    db = conn or connect(store_dir)
    try:
        yield db
    except sqlite3.Error as e:
        raise _sql_error(store_dir, e) from e
    finally:
        if conn is None:
            db.close()


def _rows(db: sqlite3.Connection) -> list[sqlite3.Row]:
    return db.execute(
        "SELECT version, fingerprint, body FROM trust_roots ORDER BY version"
    ).fetchall()


@functools.lru_cache(maxsize=16)
def _parse_installed(body: bytes) -> SignedRoot:
    """``parse_signed_root`` of an installed root's bytes, once per process: a pull or an
    import reads the root in force three to five times (the session, the acceptance, the
    recheck before publishing), always the same bytes. Pure, and ``SignedRoot`` is frozen,
    so a cached result is the result; a parse that fails is not cached."""
    return parse_signed_root(body)


def _load_row(store_dir: Path, row: sqlite3.Row) -> SignedRoot:
    try:
        signed = _parse_installed(bytes(row["body"]))
    except ApplianceError as e:
        raise StoreError(
            f"installed trust root v{row['version']} in {store_dir} is corrupt: {e}"
        ) from e
    if signed.root.version != row["version"] or signed.root.fingerprint != row["fingerprint"]:
        raise StoreError(
            f"installed trust root v{row['version']} in {store_dir} does not match its "
            f"recorded fingerprint {row['fingerprint']}"
        )
    return signed


def installed_chain(store_dir: Path, conn: sqlite3.Connection | None = None) -> list[SignedRoot]:
    """Every root this store accepted, oldest first (for carrying on media or showing)."""
    with _reading(store_dir, conn) as db:
        return [_load_row(store_dir, row) for row in _rows(db)]


def installed_root(store_dir: Path, conn: sqlite3.Connection | None = None) -> TrustRoot | None:
    """The root in force (newest installed version), or None on a fresh store."""
    with _reading(store_dir, conn) as db:
        row = db.execute(
            "SELECT version, fingerprint, body FROM trust_roots ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return _load_row(store_dir, row).root if row else None


def require_root(store_dir: Path, conn: sqlite3.Connection | None = None) -> TrustRoot:
    root = installed_root(store_dir, conn)
    if root is None:
        raise NoTrustRootError(
            f"no trust root is installed in {store_dir}; run "
            "'appliance trust install ROOT --fingerprint FP' with the fingerprint from the "
            "signing ceremony"
        )
    return root


def audit_override(
    store_dir: Path,
    *,
    subject: str,
    expires: datetime,
    now: datetime,
    reason: str,
    conn: sqlite3.Connection | None = None,
) -> None:
    """Record an --allow-expired override: what, its expiry, the host time, who and why."""
    require_override_reason(True, reason)
    details = {
        "action": "allow-expired",
        "subject": subject,
        "expires": format_timestamp(expires),
        "host_time": format_timestamp(now),
        "user": who(),
        "reason": reason,
    }
    audit.append(store_dir, "override", details, conn=conn, now=now)


def audit_refusal(store_dir: Path, action: str, error: ApplianceError, **details: Any) -> None:
    record = {"action": action, "error": type(error).__name__, "message": str(error)}
    record.update(details)
    record["user"] = who()
    audit.append(store_dir, "refusal", record)


OVERRIDE_NEEDS_REASON = "--allow-expired needs --reason TEXT: the audit log records why"


def require_override_reason(allow_expired: bool, reason: str | None) -> None:
    """An --allow-expired override is accepted only with a reason for the audit log."""
    if allow_expired and not (reason or "").strip():
        raise UsageError(OVERRIDE_NEEDS_REASON)


def _require_reason(allow_expired: bool, reason: str | None, expired: bool) -> None:
    require_override_reason(allow_expired and expired, reason)


def install_first_root(
    store_dir: Path,
    signed_root_bytes: bytes,
    fingerprint: str,
    now: datetime,
    *,
    allow_expired: bool = False,
    reason: str | None = None,
) -> TrustRoot:
    """Install a store's first root, only if it matches the fingerprint the operator read.

    Installing the same root again is a no-op; a different root on a store that has one is a
    TrustError (newer roots arrive through ``update_root``).
    """
    try:
        signed = parse_signed_root(signed_root_bytes)
        check_fingerprint(signed, fingerprint)
        root = verify_self_signed(signed, now, allow_expired=allow_expired)
    except RefusalError as e:
        audit_refusal(store_dir, "trust-install", e)
        raise
    expired = now >= root.expires
    _require_reason(allow_expired, reason, expired)
    try:
        with _transaction(store_dir, None) as db:
            rows = _rows(db)
            if rows:
                newest = rows[-1]
                if any(r["fingerprint"] == root.fingerprint for r in rows):
                    return _load_row(store_dir, newest).root  # already trusted: nothing to do
                raise TrustError(
                    f"this store already trusts root v{newest['version']} "
                    f"({newest['fingerprint']}); a different root cannot replace it. Newer "
                    "versions are accepted only through the rotation chain"
                )
            _insert(db, signed, now)
            audit.append(
                store_dir,
                "trust-install",
                {"version": root.version, "fingerprint": root.fingerprint, "user": who()},
                conn=db,
                now=now,
            )
            if expired:
                audit_override(
                    store_dir, subject=f"trust root v{root.version}", expires=root.expires,
                    now=now, reason=reason or "", conn=db,
                )
    except sqlite3.Error as e:
        raise _sql_error(store_dir, e) from e
    return root


def _insert(db: sqlite3.Connection, signed: SignedRoot, now: datetime) -> None:
    db.execute(
        "INSERT INTO trust_roots (version, fingerprint, body, installed_at) VALUES (?, ?, ?, ?)",
        (signed.root.version, signed.root.fingerprint, signed.to_bytes(), format_timestamp(now)),
    )


def update_root(
    store_dir: Path,
    chain: Sequence[SignedRoot],
    now: datetime,
    *,
    allow_expired: bool = False,
    reason: str | None = None,
    conn: sqlite3.Connection | None = None,
) -> TrustRoot:
    """Walk ``chain`` from the installed root; persist every newer version it reaches.

    A chain entry at a version this store already holds must be byte-identical to it
    (RotationError otherwise: a fork or mix-and-match). With ``conn`` the caller owns the
    transaction and records refusals itself.
    """
    try:
        with _transaction(store_dir, conn) as db:
            current = require_root(store_dir, db)
            held = {r["version"]: r["fingerprint"] for r in _rows(db)}
            for signed in chain:
                seen = held.get(signed.root.version)
                if seen is not None and seen != signed.root.fingerprint:
                    raise RotationError(
                        f"trust chain's v{signed.root.version} ({signed.root.fingerprint}) "
                        f"differs from the v{signed.root.version} this store accepted ({seen})"
                    )
            new = walk_chain(current, chain, now, allow_expired=allow_expired)
            expired = now >= new.expires
            _require_reason(allow_expired, reason, expired)
            if new.version != current.version:
                for signed in chain:
                    if current.version < signed.root.version <= new.version:
                        _insert(db, signed, now)
                audit.append(
                    store_dir,
                    "trust-update",
                    {
                        "from": current.version,
                        "to": new.version,
                        "fingerprint": new.fingerprint,
                        "user": who(),
                    },
                    conn=db,
                    now=now,
                )
            if expired:
                audit_override(
                    store_dir, subject=f"trust root v{new.version}", expires=new.expires,
                    now=now, reason=reason or "", conn=db,
                )
    except RefusalError as e:
        if conn is None and not isinstance(e, NoTrustRootError):
            audit_refusal(store_dir, "trust-update", e)
        raise
    except sqlite3.Error as e:
        raise _sql_error(store_dir, e) from e
    return new


@dataclass(frozen=True)
class RootInstall:
    """What ``install_roots`` did: ``first`` is the root installed on a fresh store (None when
    the store already trusted one), ``start`` the root in force before the chain was walked,
    ``root`` the root in force now."""

    first: TrustRoot | None
    start: TrustRoot | None
    root: TrustRoot


def read_root_file(path: Path, limits: Limits = DEFAULT_LIMITS) -> SignedRoot:
    """A trust root file the operator named (UsageError when it cannot be read or is far too
    big to be one; FormatError when it is not a trust root)."""
    try:
        with path.open("rb") as f:
            data = f.read(limits.max_trust_root_bytes + 1)
    except FileNotFoundError as e:
        raise UsageError(f"{path}: no such trust root file") from e
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    if len(data) > limits.max_trust_root_bytes:
        raise UsageError(f"{path} is too big to be a trust root file")
    return parse_signed_root(data, limits)


def install_roots(
    store_dir: Path,
    roots: Sequence[SignedRoot],
    fingerprint: str | None,
    now: datetime,
    *,
    allow_expired: bool = False,
    reason: str | None = None,
) -> RootInstall:
    """Install root files given in any order: on a fresh store the one whose fingerprint is
    ``fingerprint`` (read from the ceremony's paper) becomes the first root; then every newer
    file is walked as a rotation chain from the root in force."""
    require_override_reason(allow_expired, reason)
    chain = sorted(roots, key=lambda s: s.root.version)
    fresh = installed_root(store_dir) is None
    first = None
    if fresh and not (fingerprint or "").strip():
        raise UsageError(
            "this store trusts no root yet: give the fingerprint read from the signing "
            "ceremony's paper (--fingerprint; not from the file)"
        )
    if fingerprint and fingerprint.strip():
        wanted = normalize_fingerprint(fingerprint)
        matching = [s for s in chain if s.root.fingerprint == wanted]
        if not matching:
            # The actual fingerprints are not shown: an operator must not copy them from here.
            error = FingerprintMismatchError(
                f"no root file given has the fingerprint {wanted}: do not install them; get "
                "the root files and the paper from the signing ceremony again"
            )
            audit_refusal(store_dir, "trust-install", error)
            raise error
        if fresh:
            first = install_first_root(store_dir, matching[0].to_bytes(), wanted, now,
                                       allow_expired=allow_expired, reason=reason)
            chain = [s for s in chain if s.root.version > first.version]
            if not chain:
                return RootInstall(first, None, first)
    start = require_root(store_dir)
    root = update_root(store_dir, chain, now, allow_expired=allow_expired, reason=reason)
    return RootInstall(first, start, root)


def channel_state(
    store_dir: Path, channel: str, conn: sqlite3.Connection | None = None
) -> tuple[int, str] | None:
    """(highest sequence accepted, its manifest hash) for ``channel``, or None."""
    with _reading(store_dir, conn) as db:
        row = db.execute(
            "SELECT sequence, manifest_hash FROM channels WHERE name = ?", (channel,)
        ).fetchone()
    return (int(row["sequence"]), str(row["manifest_hash"])) if row else None


def check_channel(
    store_dir: Path, bundle: AuthenticatedBundle, conn: sqlite3.Connection | None = None
) -> None:
    """Read-only: RollbackError when the channel's high-water mark refuses this bundle
    (``record_acceptance`` checks again in the transaction that raises the mark)."""
    manifest = bundle.manifest
    check_rollback(channel_state(store_dir, manifest.channel, conn), manifest.sequence,
                   bundle.manifest_hash, channel=manifest.channel)


def record_channel(
    store_dir: Path,
    channel: str,
    sequence: int,
    manifest_hash: str,
    conn: sqlite3.Connection | None = None,
    *,
    now: datetime | None = None,
) -> None:
    """Raise the channel's high-water mark; RollbackError if that would lower it."""
    if not channel:
        raise UsageError("a channel name is needed")
    try:
        with _transaction(store_dir, conn) as db:
            previous = channel_state(store_dir, channel, db)
            check_rollback(previous, sequence, manifest_hash, channel=channel)
            if previous is None or sequence > previous[0]:
                db.execute(
                    "INSERT INTO channels (name, sequence, manifest_hash, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "sequence = excluded.sequence, manifest_hash = excluded.manifest_hash, "
                    "updated_at = excluded.updated_at",
                    (channel, sequence, manifest_hash, format_timestamp(now or datetime.now(UTC))),
                )
    except sqlite3.Error as e:
        raise _sql_error(store_dir, e) from e


def record_acceptance(
    store: Store,
    bundle: AuthenticatedBundle,
    now: datetime,
    *,
    allow_expired: bool,
    reason: str | None,
    action: str,
    **refusal_details: Any,
) -> None:
    """Accept an authenticated bundle into the store, all or nothing.

    One transaction: persist the newer trust roots the bundle's chain reached, raise the
    channel's high-water mark (``RollbackError`` for an older sequence), record the manifest
    with its signatures (peers re-serve them) and its import, and audit an --allow-expired
    override. A refusal is audited as ``action`` ("import", "pull") with ``refusal_details``
    and the manifest hash.
    """
    manifest = bundle.manifest
    origin = BundleOrigin(
        manifest_hash=bundle.manifest_hash,
        channel=manifest.channel,
        sequence=manifest.sequence,
        manifest_bytes=bundle.manifest_bytes,
        signatures=tuple(s.to_bytes().decode("ascii").strip() for s in bundle.signatures),
        signers=tuple(sorted(bundle.signers)),
    )
    store_dir = store.store_dir
    try:
        with store.transaction() as conn:
            update_root(store_dir, bundle.chain, now, allow_expired=allow_expired,
                        reason=reason, conn=conn)
            record_channel(store_dir, manifest.channel, manifest.sequence,
                           bundle.manifest_hash, conn, now=now)
            store.add_manifest(origin, manifest.total_bytes, now)
            if bundle.expired_override:
                audit_override(
                    store_dir, subject=f"bundle {manifest.channel} #{manifest.sequence}",
                    expires=manifest.expires, now=now, reason=reason or "", conn=conn,
                )
    except RefusalError as e:
        audit_refusal(store_dir, action, e, **refusal_details, manifest=bundle.manifest_hash)
        raise
    audit.sync_head(store_dir, store.conn)


def installed_versions(store_dir: Path) -> list[tuple[int, str, str]]:
    """(version, fingerprint, installed at) for every accepted root, oldest first."""
    with _reading(store_dir) as db:
        return [
            (int(r["version"]), r["fingerprint"], r["installed_at"])
            for r in db.execute("SELECT * FROM trust_roots ORDER BY version")
        ]


def channels(store_dir: Path) -> list[tuple[str, int, str, str]]:
    """Every channel: (name, sequence, manifest hash, updated at), by name."""
    with _reading(store_dir) as db:
        return [
            (r["name"], int(r["sequence"]), r["manifest_hash"], r["updated_at"])
            for r in db.execute("SELECT * FROM channels ORDER BY name")
        ]
