"""``appliance torrent fetch``: a torrent (or magnet) into the store through the ingest session.

``fetch`` reads the torrent (a magnet first gets the info dict from peers, with downloading
held off by upload mode), decodes the signed manifest it carries (``meta``), checks that this
host may join (an SSL torrent's CA must be this site's CA; a plaintext one needs
``--insecure``), and runs the one ingest session (``appliance.store.ingest``): the session
authenticates the manifest against THIS host's trust root and checks rollback; only then does
``TorrentSource`` check that the torrent lists exactly the signed files and sizes and add it to
libtorrent, with every piece that holds only chunks the store already has at priority 0.

libtorrent downloads the rest straight into the session's staged files (its save path is a
tree of links to them, ``storage.link_tree``, under ``STORE/torrent-scratch/<infohash>``,
removed once the model is published: the model is on disk once; the fetch holds that
directory, ``scratch.held``, so ``store gc`` leaves it alone) and checks every piece
against the torrent's SHA-256 Merkle tree; a peer that sends bad blocks is banned by
libtorrent. As the pieces that cover a chunk are all there, the source reads them
(``read_piece``), cuts out the chunk and delivers it to the session's sink, which checks it
against the signed manifest's BLAKE3 digest before it counts: a torrent whose hashes describe
other bytes than the manifest stops with ``IntegrityError`` and nothing is published. After a
kill, the done chunks a bad peer may have touched (marked not done meanwhile) are written back
from their kept copies and marked done again (``storage.Guard``) before the session starts,
the session's durable chunks are not asked for again, and libtorrent is told which pieces the
store holds (no re-hash of the staged files).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libtorrent as lt

from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.errors import (
    FormatError,
    PeerError,
    RefusalError,
    UsageError,
)
from appliance.fsutil import read_capped
from appliance.limits import DEFAULT_LIMITS, MiB
from appliance.store import layout, trust_state
from appliance.store.ingest import IngestOutcome, IngestSession
from appliance.store.store import Store
from appliance.torrent import meta
from appliance.torrent import scratch as scratch_dirs
from appliance.torrent.certs import TorrentIdentity, same_certificate
from appliance.torrent.session import SwarmOptions, add_flags, connect_peers, open_session
from appliance.torrent.source import FILES_DIR, TorrentSource
from appliance.torrent.storage import GUARD_DIR, Guard, places, stored_files

Progress = Callable[[int, int], None]
Notify = Callable[[str], None]
MAX_TORRENT_BYTES = 64 * MiB  # a torrent file: the piece layers of a very large model fit
_POLL_MS = 100
_RECONNECT_S = 2.0


@dataclass(frozen=True)
class FetchOptions:
    swarm: SwarmOptions = field(default_factory=lambda: SwarmOptions(listen="0.0.0.0:0"))
    identity: TorrentIdentity | None = None  # None: plaintext torrents only (--insecure)
    wait_for_pieces: float = 60.0  # give up when no piece arrives for this long
    metadata_timeout: float = 60.0  # a magnet: give up when no peer sent the info dict
    scratch: Path | None = None  # default STORE/torrent-scratch
    allow_expired: bool = False
    reason: str | None = None
    flush_bytes: int = 1 * MiB  # durable (and resumable) at least this often


@dataclass
class FetchResult:
    infohash: str
    manifest_hash: str
    channel: str
    sequence: int
    model: str  # name:version
    complete: bool
    present: bool  # already in the store before this run
    bytes_total: int = 0
    bytes_fetched: int = 0  # delivered from the swarm by this run
    bytes_local: int = 0  # copied from chunks the store already held
    already_done_bytes: int = 0  # durable before this run (a resumed fetch)
    hash_failures: int = 0  # pieces libtorrent refused (bad data from a peer)
    banned: list[str] = field(default_factory=list)  # HOST:PORT of peers libtorrent banned
    seconds: float = 0.0


def read_torrent(path: Path) -> bytes:
    return read_capped(path, MAX_TORRENT_BYTES, "torrent file", error=UsageError,
                       special=UsageError)


def parse_torrent(data: bytes) -> lt.torrent_info:
    try:
        return lt.torrent_info(data)
    except (RuntimeError, TypeError) as e:
        raise FormatError(f"not a valid torrent: {e}") from e


def check_membership(ti: lt.torrent_info, identity: TorrentIdentity | None) -> None:
    """An SSL torrent of this site with a site identity; plaintext only without one."""
    root_cert = ti.ssl_cert()
    if identity is None:
        if root_cert:
            raise UsageError("this is an SSL torrent (site members only): give the TLS "
                             "directory with the torrent certificate instead of --insecure")
        return
    if not root_cert:
        raise UsageError("this torrent is plaintext (made with --insecure): pass --insecure "
                         "to fetch it without site certificates")
    if not same_certificate(root_cert, identity.ca_pem):
        raise UsageError("this SSL torrent is for another site's CA, not the one in this "
                         "host's TLS directory")


def fetch(
    store_dir: Path,
    torrent: bytes | str,
    *,
    options: FetchOptions | None = None,
    now: datetime | None = None,
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> FetchResult:
    """Fetch the model of ``torrent`` (.torrent bytes or a magnet URI) into the store."""
    opts = options or FetchOptions()
    moment = now or datetime.now(UTC)
    say = notify or (lambda _message: None)
    trust_state.require_override_reason(opts.allow_expired, opts.reason)
    session = open_session(opts.swarm, secure=opts.identity is not None)
    # Scratch directories this fetch works in, held until libtorrent has stopped (below).
    holds = contextlib.ExitStack()
    try:
        if isinstance(torrent, str):
            if opts.identity is not None:
                raise UsageError("a magnet link cannot start an SSL torrent (its CA is in the "
                                 "info dict it would fetch): give the .torrent file")
            magnet = _magnet(session, torrent, store_dir, opts, say, holds)
            got = magnet.torrent_file()
            if got is None:
                raise PeerError("the swarm's info dict could not be read")
            handle: lt.torrent_handle | None = magnet
            ti = got
        else:
            handle, ti = None, parse_torrent(torrent)
        check_membership(ti, opts.identity)
        carried = meta.decode(ti.info_section())
        return _ingest(store_dir, session, ti, handle, carried, opts, moment, progress, say,
                       holds)
    finally:
        session.pause()
        del session
        holds.close()


def _scratch(store_dir: Path, opts: FetchOptions, infohash: str) -> Path:
    return (opts.scratch or scratch_dirs.scratch_root(store_dir)) / infohash


def _magnet(session: lt.session, uri: str, store_dir: Path, opts: FetchOptions,
            say: Notify, holds: contextlib.ExitStack) -> lt.torrent_handle:
    try:
        params = lt.parse_magnet_uri(uri)
    except RuntimeError as e:
        raise UsageError(f"not a magnet link: {e}") from e
    hashes = params.info_hashes
    name = str(hashes.v2) if hashes.has_v2() else str(hashes.v1)
    params.save_path = str(holds.enter_context(
        scratch_dirs.held(_scratch(store_dir, opts, name))) / FILES_DIR)
    # Upload mode: the info dict may come in, no file byte before the manifest is trusted.
    params.flags |= add_flags("upload_mode")
    handle = session.add_torrent(params)
    deadline = time.monotonic() + opts.metadata_timeout
    last_connect = 0.0
    while not handle.status().has_metadata:
        if time.monotonic() > deadline:
            raise PeerError(f"no peer sent the torrent's info dict in {opts.metadata_timeout:g} s")
        if time.monotonic() - last_connect > _RECONNECT_S:
            connect_peers(handle, opts.swarm.peers)
            last_connect = time.monotonic()
        session.wait_for_alert(_POLL_MS)
        session.pop_alerts()
    say("got the torrent's info dict from the swarm")
    return handle


def _ingest(store_dir: Path, session: lt.session, ti: lt.torrent_info,
            handle: lt.torrent_handle | None, carried: meta.Carried, opts: FetchOptions,
            now: datetime, progress: Progress | None, say: Notify,
            holds: contextlib.ExitStack) -> FetchResult:
    infohash = meta.infohash(ti)
    scratch = _scratch(store_dir, opts, infohash)
    holder: dict[str, TorrentSource] = {}
    try:  # as a peer pull does: authenticated before the writer lock, the session re-checks
        root = trust_state.require_root(store_dir)
        chain = [s for s in carried.chain if s.root.version > root.version]
        bundle = authenticate_manifest(carried.manifest, carried.signatures, chain, root, now,
                                       allow_expired=opts.allow_expired, limits=DEFAULT_LIMITS)
        model = meta.find_model(bundle.manifest.models, carried)
    except RefusalError as e:
        trust_state.audit_refusal(store_dir, "torrent", e, torrent=infohash)
        raise

    def source(_bundle: AuthenticatedBundle) -> TorrentSource:
        meta.check_files(ti, model)  # refused (and audited) before any file byte is asked
        holds.enter_context(scratch_dirs.held(scratch))
        holder["source"] = TorrentSource(
            session, ti, handle, model, scratch, store, peers=opts.swarm.peers,
            identity=opts.identity, wait_for_pieces=opts.wait_for_pieces, notify=say)
        return holder["source"]

    def summary(outcome: IngestOutcome) -> dict[str, Any]:
        src = holder.get("source")
        return {
            "manifest": outcome.bundle.manifest_hash,
            "channel": outcome.bundle.manifest.channel,
            "sequence": outcome.bundle.manifest.sequence,
            "models": [f"{model.name}:{model.version}"],
            "torrent": infohash,
            "bytes_fetched": outcome.source_bytes,
            "bytes_local": outcome.local_bytes,
            "hash_failures": src.hash_failures if src else 0,
            "banned": sorted(src.banned) if src else [],
            "user": trust_state.who(),
        }

    with layout.writer_lock(store_dir, "torrent fetch"), Store(
        store_dir, flush_bytes=opts.flush_bytes
    ) as store:
        # A fetch killed while libtorrent wrote: chunks it may have touched are put back first.
        guard = Guard(scratch / GUARD_DIR)
        if guard.saved():
            meta.check_files(ti, model)
            files = stored_files(store, model.name, model.version)
            guard.restore(places(ti, model, files), store)
            say("wrote back the chunks a killed fetch had kept aside")
        ingest = IngestSession(store, action="torrent", now=now,
                               allow_expired=opts.allow_expired, reason=opts.reason,
                               progress=progress, context={"torrent": infohash})
        outcome = ingest.run(bundle, source, models=[model],
                             purpose=lambda _b: f"fetching {model.name}:{model.version}",
                             summary=summary)
    src = holder.get("source")
    if outcome.complete:
        shutil.rmtree(scratch, ignore_errors=True)
    return FetchResult(
        infohash=infohash, manifest_hash=outcome.bundle.manifest_hash,
        channel=outcome.bundle.manifest.channel, sequence=outcome.bundle.manifest.sequence,
        model=f"{carried.name}:{carried.version}", complete=outcome.complete,
        present=bool(outcome.present), bytes_total=outcome.total_bytes,
        bytes_fetched=outcome.source_bytes, bytes_local=outcome.local_bytes,
        already_done_bytes=outcome.already_done_bytes,
        hash_failures=src.hash_failures if src else 0,
        banned=sorted(src.banned) if src else [], seconds=outcome.seconds,
    )
