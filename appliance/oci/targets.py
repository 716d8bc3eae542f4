"""The one interface push and pull see, whether the far side is a registry or a layout dir.

``Registry`` (``appliance.oci.registry``) and ``OciLayout`` (``appliance.oci.layout``)
implement it, so push, pull, the referrer discovery and the chunk source are written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from appliance.oci.mapping import Descriptor


class Target(Protocol):
    name: str  # for messages and the audit log

    def has_blob(self, digest: str) -> bool: ...

    def put_blob(self, digest: str, size: int, body: Callable[[], Iterable[bytes]]) -> None:
        """Store ``body()`` (``size`` bytes hashing to ``digest``)."""
        ...

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> bool:
        """Store a manifest under a tag or its digest; True when the far side indexed its
        ``subject`` itself (no referrers tag needed)."""
        ...

    def get_manifest(self, reference: str) -> tuple[bytes, str] | None:
        """(exact bytes, sha256 digest) of a manifest by tag or digest; None if absent."""
        ...

    def get_blob(self, digest: str, cap: int) -> bytes: ...

    def read_range(self, digest: str, start: int, end: int
                   ) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """Bytes ``[start, end)`` of a blob, in pieces (fewer when the far side stops)."""
        ...

    def referrers(self, digest: str, artifact_type: str) -> list[Descriptor] | None:
        """Manifests whose subject is ``digest``; None when the far side cannot list them."""
        ...

    def close(self) -> None: ...
