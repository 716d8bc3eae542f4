"""Parity volumes: the erasure code (zfec) over a bundle's data volumes, written at build time.

``bundle build --parity K`` adds K parity volumes ``par-001`` .. ``par-K`` next to the data
volumes ``vol-001`` .. ``vol-C``. Any K data volumes that are missing or damaged are rebuilt
from the others during import and verify (``appliance.bundle.parity_rebuild``), into a scratch
directory, and then read like any volume: every chunk of a rebuilt volume is still checked
against the signed manifest.

The code: each data volume's **stream** is its packs concatenated in order (the index is not
coded: it names the manifest, which is written after the parity, so each parity volume
carries a copy of every data volume's index instead; a reader checks an index copy against
the signed manifest like the original). Streams are zero-padded to ``stripes * block_size``;
stripe j is block j of each of the C streams, coded by zfec (k = C, m = C + K) into K parity
blocks, one per parity volume. Memory is ``(C + K) * block_size`` whatever the bundle's size.
The manifest's ``parity`` section (``appliance.format.parity_field``) holds each parity
file's size and BLAKE3, so the publisher's signature covers the parity volumes: a parity file
that does not hash to the signed value is refused (``IntegrityError``), after a rebuild that
used it and before the rebuilt volume is used. The layout is in docs/FORMAT.md, "Parity
volumes".

The byte layout (header, streams) is ``appliance.bundle.parity_layout``. Here, the builder's
side: ``write_parity(data_dirs, staging, count)`` codes the packs into parity files, and
``finish_parity(...)`` adds the index copies, trust chain, signatures and manifest.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import blake3
import zfec

from appliance import fsutil
from appliance.bundle.media import (
    INDEX_NAME,
    MANIFEST_NAME,
    SIGNATURE_SUFFIX,
    SIGNATURES_DIR,
    TRUST_DIR,
    root_file_name,
    volume_name,
)
from appliance.bundle.parity_layout import (
    BLOCK_BYTES,
    INDEXES_DIR,
    PARITY_NAME,
    ParityHeader,
    StreamReader,
    pack_files,
    parity_volume_name,
)
from appliance.errors import UsageError
from appliance.format.parity_field import (
    MAX_SHARES,
    PARITY_SCHEME,
    ParitySection,
    ParityVolume,
)
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot

_AHEAD = 2  # stripes read (and written) ahead of the encoder
_CODERS = 2  # stripes coded at once


# ---------------------------------------------------------------------------------------------
# Building


def write_parity(data_dirs: Sequence[Path], staging: Path, count: int, *,
                 block_size: int = BLOCK_BYTES) -> tuple[ParitySection, list[Path]]:
    """Code the packs of ``data_dirs`` (volume 1..k, in order) into ``count`` parity files in
    ``staging/par-NNN/``; returns the manifest section and the parity volume dirs."""
    k = len(data_dirs)
    if count < 1 or k + count > MAX_SHARES:
        raise UsageError(f"--parity must be 1 to {MAX_SHARES - k} for {k} data volume(s)")
    packs = [[(p, p.stat().st_size) for p in pack_files(d)] for d in data_dirs]
    lengths = tuple(sum(size for _, size in v) for v in packs)
    stripes = max(1, -(-max(lengths) // block_size))
    m = k + count
    headers = [ParityHeader(k + i, k, m, block_size, stripes, lengths) for i in range(count)]
    dirs = [staging / parity_volume_name(i + 1) for i in range(count)]
    readers = [StreamReader(p, volume_name(n)) for n, p in enumerate(packs, start=1)]
    hashes = [blake3.blake3() for _ in range(count)]
    files: list[BinaryIO] = []
    try:
        for path, header in zip(dirs, headers, strict=True):
            path.mkdir()
            files.append((path / PARITY_NAME).open("xb"))
            files[-1].write(header.encode())
        for h, header in zip(hashes, headers, strict=True):
            h.update(header.encode())
        encoder = zfec.Encoder(k, m)
        wanted = tuple(range(k, m))

        def read_stripe() -> tuple[bytes, ...]:
            return tuple(r.read(block_size) for r in readers)

        unsynced = [0]  # bytes written since the last writeback started (writer thread only)

        def write_stripe(blocks: Sequence[bytes]) -> None:
            for out, h, block in zip(files, hashes, blocks, strict=True):
                out.write(block)
                h.update(block)
            unsynced[0] += block_size
            if unsynced[0] >= fsutil.WRITEBACK_BYTES:  # the closing fsync finds little left
                for out in files:
                    out.flush()
                    fsutil.start_writeback(out.fileno())
                unsynced[0] = 0

        # A reader, _CODERS encoders (zfec lets go of the GIL while it codes) and a writer run
        # side by side, each at most _AHEAD stripes ahead (memory stays flat); stripes are
        # written in order.
        with ThreadPoolExecutor(1, "parity-read") as reading, \
                ThreadPoolExecutor(_CODERS, "parity-code") as coding, \
                ThreadPoolExecutor(1, "parity-write") as writing:
            ahead: deque[Future[tuple[bytes, ...]]] = deque(
                reading.submit(read_stripe) for _ in range(min(_AHEAD, stripes)))
            coded: deque[Future[list[bytes]]] = deque()
            written: deque[Future[None]] = deque()

            def write_next() -> None:
                written.append(writing.submit(write_stripe, coded.popleft().result()))
                while len(written) > _AHEAD:
                    written.popleft().result()

            for j in range(stripes):
                blocks = ahead.popleft().result()
                if j + len(ahead) + 1 < stripes:
                    ahead.append(reading.submit(read_stripe))
                coded.append(coding.submit(encoder.encode, blocks, wanted))
                if len(coded) >= _CODERS:
                    write_next()
            while coded:
                write_next()
            while written:
                written.popleft().result()
        for out in files:
            out.flush()
            os.fsync(out.fileno())
    finally:
        for out in files:
            out.close()
        for r in readers:
            r.close()
    volumes = tuple(ParityVolume(h.share, h.size + stripes * block_size, d.hexdigest())
                    for h, d in zip(headers, hashes, strict=True))
    return ParitySection(PARITY_SCHEME, block_size, k, stripes, volumes), dirs


def finish_parity(parity_dirs: Sequence[Path], out_dir: Path, data_volumes: Sequence[Path],
                  manifest: bytes, signatures: Sequence[Signature],
                  chain: Sequence[tuple[SignedRoot, bytes]], moved: list[Path]) -> list[Path]:
    """Index copies and trust chain into each parity volume, move it into ``out_dir``, then
    its signatures and, last, its manifest (as the builder does for data volumes)."""
    finals = []
    for staged in parity_dirs:
        (staged / INDEXES_DIR).mkdir()
        for number, volume in enumerate(data_volumes, start=1):
            shutil.copyfile(volume / INDEX_NAME,
                            staged / INDEXES_DIR / f"{volume_name(number)}.bin")
        (staged / TRUST_DIR).mkdir()
        for signed, raw in chain:
            fsutil.write_atomic(staged / TRUST_DIR / root_file_name(signed.root.version), raw,
                                sync_dir=False)
        (staged / SIGNATURES_DIR).mkdir()
        target = out_dir / staged.name
        os.rename(staged, target)
        moved.append(target)
        finals.append(target)
    fsutil.fsync_dir(out_dir, strict=False)
    for target in finals:
        for sig in signatures:
            fsutil.write_atomic(target / SIGNATURES_DIR / f"{sig.key_id}{SIGNATURE_SUFFIX}",
                                sig.to_bytes(), sync_dir=False)
        fsutil.write_atomic(target / MANIFEST_NAME, manifest, sync_dir=False)
    return finals
