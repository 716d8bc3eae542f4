"""The manifest's optional ``parity`` section: which parity volumes a bundle has, signed.

Pure: values in, values out. The section commits the publisher's signature to the parity
volumes (their exact bytes, by BLAKE3), so a tampered or swapped parity volume is refused
before any of its bytes rebuilds a data volume. A manifest without the field is a bundle
without parity and reads exactly as before (old manifests keep their bytes and their hash).
The erasure coding itself lives in ``appliance.bundle.parity``; the layout is in
docs/FORMAT.md, section "Parity volumes".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.errors import FormatError
from appliance.format import fields

PARITY_SCHEME = "zfec-1"
# zfec codes at most 256 shares; the block size bounds the memory of encode and rebuild.
MAX_SHARES = 256
MIN_BLOCK_BYTES = 4096
MAX_BLOCK_BYTES = 64 * 1024 * 1024
MAX_PARITY_BYTES = 1 << 42


@dataclass(frozen=True)
class ParityVolume:
    """One parity volume: its share number (``data_volumes`` .. total-1), the size and the
    BLAKE3 (hex) of its ``parity.bin``."""

    share: int
    size: int
    blake3: str


@dataclass(frozen=True)
class ParitySection:
    scheme: str
    block_size: int
    data_volumes: int  # k: the data volumes the code spans (the bundle's volume count)
    stripes: int  # blocks per share
    volumes: tuple[ParityVolume, ...]

    @property
    def total_shares(self) -> int:
        return self.data_volumes + len(self.volumes)


def parity_to_value(section: ParitySection) -> dict[str, Any]:
    return {
        "scheme": section.scheme, "block_size": section.block_size,
        "data_volumes": section.data_volumes, "stripes": section.stripes,
        "volumes": [{"share": v.share, "size": v.size, "blake3": v.blake3}
                    for v in section.volumes],
    }


def parse_parity(raw: object, where: str = "manifest parity") -> ParitySection:
    """Check the section's fields (``FormatError``, ``LimitExceededError``)."""
    value = fields.record(raw, {"scheme", "block_size", "data_volumes", "stripes", "volumes"},
                          where)
    if value["scheme"] != PARITY_SCHEME:
        raise FormatError(f"{where}: unknown scheme {value['scheme']!r}")
    block = fields.integer(value["block_size"], f"{where} block_size",
                           minimum=MIN_BLOCK_BYTES, maximum=MAX_BLOCK_BYTES)
    k = fields.integer(value["data_volumes"], f"{where} data_volumes", minimum=1,
                       maximum=MAX_SHARES - 1)
    stripes = fields.integer(value["stripes"], f"{where} stripes", minimum=1,
                             maximum=MAX_PARITY_BYTES // block, cap=True)
    raw_volumes = fields.items(value["volumes"], f"{where} volumes", nonempty=True,
                               max_items=MAX_SHARES - k)
    volumes = []
    for i, item in enumerate(raw_volumes):
        entry = fields.record(item, {"share", "size", "blake3"}, f"{where} volumes[{i}]")
        share = fields.integer(entry["share"], f"{where} volumes[{i}] share",
                               minimum=k + i, maximum=k + i)  # shares k, k+1, ... in order
        size = fields.integer(entry["size"], f"{where} volumes[{i}] size", minimum=1,
                              maximum=MAX_PARITY_BYTES, cap=True)
        volumes.append(ParityVolume(share, size,
                                    fields.hex64(entry["blake3"], f"{where} volumes[{i}]")))
    return ParitySection(PARITY_SCHEME, block, k, stripes, tuple(volumes))
