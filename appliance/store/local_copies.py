"""The chunk reader over the verified copies the store already holds (another version,
another quant, a resumed run): the ingest session reads these before asking its source."""

from __future__ import annotations

from collections.abc import Mapping

from appliance.store.specs import LocalChunk, read_local_copy
from appliance.store.store import Store


class LocalCopies:
    """``ChunkReader`` over the verified copies the store already holds."""

    runs_check_chunk = True  # read_local_copy returns only bytes check_chunk passed

    def __init__(self, store: Store) -> None:
        self.store = store
        self._where: dict[str, list[LocalChunk]] = {}

    def plan(self, needed: Mapping[str, int]) -> list[str]:
        held = self.store.held_digests()
        for digest in needed:
            if digest in held:
                found = self.store.find_chunk(digest)
                if found:
                    self._where[digest] = found
        return list(self._where)

    def read(self, digest: str, length: int) -> bytes | None:
        for loc in self._where.get(digest, ()):
            try:
                data = read_local_copy(loc)
            except FileNotFoundError:
                continue  # renamed by a publish: the source serves it as well
            if data is not None:
                return data
        return None  # every copy went bad: left for the source
