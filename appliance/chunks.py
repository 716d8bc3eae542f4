"""The one chunk check: a chunk's plain bytes have the signed length and BLAKE3 digest.

Every place that takes chunk bytes from somewhere it does not trust (media packs, a peer's
answer, a local copy that may have rotted, a stored file under ``store verify``) calls
``check_chunk``; the ``IntegrityError`` it raises names the chunk and, when given, the file,
volume, offset, pack and peer, so the operator can tell which disc or host to distrust.
"""

from __future__ import annotations

import blake3

from appliance.errors import IntegrityError


def check_chunk(
    data: bytes | bytearray | memoryview,
    digest: str,
    length: int | None = None,
    *,
    file: str | None = None,
    volume: str | None = None,
    offset: int | None = None,
    pack: str | None = None,
    peer: str | None = None,
    one_core: bool = False,
) -> None:
    """``IntegrityError`` unless ``data`` is exactly ``length`` bytes hashing to ``digest``.

    ``length`` may be left out only where the bytes were already cut to the signed length
    (a decompressor capped at it); the digest then decides alone. ``one_core``: the caller
    already keeps every core busy with chunks of its own (``bundle verify``'s workers), where
    splitting each hash across cores only adds overhead.
    """
    source = f" from {peer}" if peer else ""
    where = f" in {pack}" if pack else ""
    if length is not None and len(data) != length:
        raise IntegrityError(
            f"chunk{source}{where} is {len(data)} bytes, the signed manifest says {length}",
            chunk=digest, file=file, volume=volume, offset=offset,
        )
    # Large chunks hash faster across cores; blake3 releases the GIL either way.
    threads = 1 if one_core else blake3.blake3.AUTO
    if blake3.blake3(data, max_threads=threads).hexdigest() != digest:
        raise IntegrityError(
            f"chunk bytes{source}{where} differ from the signed manifest",
            chunk=digest, file=file, volume=volume, offset=offset,
        )
