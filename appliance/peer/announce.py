"""In-flight announcements: which chunks this host's running pull is fetching right now.

A pull and the peer server of the same host are separate processes over one store. While a
pull runs, ``Announcer`` keeps the chunks it has asked a peer for (or received but not yet made
durable) in a small file, ``STORE/peer-fetching/<manifest hash>``: the have-map bitmap layout
(``protocol.encode_bitmap`` over the manifest's unique chunks), replaced atomically on every
change and rewritten every ``keepalive`` seconds while unchanged. The server answers
``/v1/have/<hash>?fetching=1`` with that bitmap beside the have-map (``read_fetching``), so
other pullers leave a chunk on its way here to come from here, instead of asking the seed
for it a second time.

The file is a hint between a host's own processes, never trusted for content: a file whose
length is not the bitmap's exact size, or older than ``max_age`` (a pull that died without
removing it), counts as no announcement. Only one pull writes a store at a time (the writer
lock), so one file per manifest is enough. Writes are not fsynced: after a crash the file is
stale anyway.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from appliance.errors import PeerProtocolError
from appliance.peer import protocol

FETCHING_DIR = "peer-fetching"
# A live pull rewrites its file at least every KEEPALIVE seconds; a reader ignores files older
# than MAX_AGE, so a killed pull's announcement is gone a few seconds later.
KEEPALIVE = 1.0
MAX_AGE = 5.0


def fetching_path(store_dir: Path, manifest_hash: str) -> Path:
    protocol.have_path(manifest_hash)  # a digest, nothing else, names the file (UsageError)
    return store_dir / FETCHING_DIR / manifest_hash


class Announcer:
    """The pull's side: ``update(digests)`` from the swarm's loop, ``close()`` when it ends."""

    def __init__(self, store_dir: Path, manifest_hash: str, unique: Sequence[str], *,
                 keepalive: float = KEEPALIVE) -> None:
        self.path = fetching_path(store_dir, manifest_hash)
        self.index = {digest: i for i, digest in enumerate(unique)}
        self.count = len(unique)
        self.keepalive = keepalive
        self._last: frozenset[str] | None = None
        self._written_at = -float("inf")

    def update(self, digests: Collection[str]) -> None:
        """Announce ``digests`` (chunks on their way here); cheap when nothing changed."""
        current = frozenset(d for d in digests if d in self.index)
        moment = time.monotonic()
        if current == self._last and moment - self._written_at < self.keepalive:
            return
        flags = [False] * self.count
        for digest in current:
            flags[self.index[digest]] = True
        try:
            self.path.parent.mkdir(exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(protocol.encode_bitmap(flags))
            os.replace(tmp, self.path)
        except OSError:
            return  # a hint only: a full or read-only disk must not stop the pull
        self._last, self._written_at = current, moment

    def close(self) -> None:
        with contextlib.suppress(OSError):  # stale in MAX_AGE seconds anyway
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_fetching(store_dir: Path, manifest_hash: str, count: int, *,
                  max_age: float = MAX_AGE) -> list[bool]:
    """The server's side: which of the ``count`` unique chunks this host's pull announces
    (all False when no pull runs, or its file is stale or malformed)."""
    path = fetching_path(store_dir, manifest_hash)
    size = (count + 7) // 8
    none = [False] * count
    try:
        # Non-blocking and no symlinks: a FIFO or a link in its place never stalls a server.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return none
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime > max_age:
            return none
        data = os.read(fd, size + 1)
        return protocol.decode_bitmap(data, count)
    except (OSError, PeerProtocolError):
        return none
    finally:
        os.close(fd)
