"""A volume's small files, listed and read with caps before any trust decision.

``scan_names`` lists a directory without walking millions of entries, ``read_signatures`` the
signature files, ``list_chain`` / ``read_chain`` the carried trust roots, and
``walk_carried_roots`` reads and parses carried roots only once a trusted key signed them;
``refuse_special`` refuses a FIFO or device by ``stat`` alone. ``appliance.bundle.reader``
opens volumes with these.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from appliance.bundle.media import SIGNATURE_SUFFIX, SIGNATURES_DIR, TRUST_DIR
from appliance.errors import (
    FormatError,
    LimitExceededError,
    MediaError,
    SignatureError,
    SpecialFileError,
)
from appliance.format.signing import Signature
from appliance.format.trust import (
    SignedRoot,
    TrustRoot,
    check_same_root,
    next_root,
    parse_envelope,
    parse_signed_root,
)
from appliance.fsutil import read_capped
from appliance.limits import DEFAULT_LIMITS, Limits

_ROOT_FILE = re.compile(r"root-([1-9][0-9]{0,17})\.yaml")


def scan_names(directory: Path, suffix: str, cap: int, what: str) -> list[str]:
    """Names ending in ``suffix`` (not hidden) in ``directory``, sorted; [] if it is absent.

    Stops with ``LimitExceededError`` as soon as more than ``cap`` such names, or more than
    ``4 * cap + 64`` entries of any kind, were seen: a directory of millions of files costs
    neither the memory of listing it nor the time of walking it to the end."""
    names: list[str] = []
    seen = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                seen += 1
                if entry.name.endswith(suffix) and not entry.name.startswith("."):
                    names.append(entry.name)
                if len(names) > cap or seen > 4 * cap + 64:
                    raise LimitExceededError(
                        f"{directory} holds more than {cap} {what} (or other files), over the cap"
                    )
    except FileNotFoundError:
        return []
    except OSError as e:
        raise MediaError(f"cannot list {directory}: {e}") from e
    return sorted(names)


def read_signatures(volume_dir: Path, limits: Limits) -> tuple[Signature, ...]:
    sig_dir = volume_dir / SIGNATURES_DIR
    names = scan_names(sig_dir, SIGNATURE_SUFFIX, limits.max_signatures, "signatures")
    signatures = []
    for name in names:
        data = read_capped(sig_dir / name, limits.max_signature_bytes, f"signature {name}")
        sig = Signature.from_bytes(data, limits)
        if name != sig.key_id + SIGNATURE_SUFFIX:
            raise SignatureError(f"signature file {name} holds a signature by {sig.key_id}")
        signatures.append(sig)
    return tuple(signatures)


def list_chain(volume_dir: Path, limits: Limits) -> tuple[tuple[int, Path], ...]:
    """(version, path) of each carried root, from the names alone: nothing is read yet."""
    trust_dir = volume_dir / TRUST_DIR
    names = scan_names(trust_dir, ".yaml", limits.max_trust_chain_length, "trust roots")
    files = []
    for name in names:
        match = _ROOT_FILE.fullmatch(name)
        if match is None:
            raise FormatError(f"{trust_dir / name} is not named root-<version>.yaml")
        files.append((int(match.group(1)), trust_dir / name))
    refuse_special([path for _, path in files], f"{volume_dir.name}: a carried trust root")
    return tuple(sorted(files))


def _read_root(path: Path, limits: Limits) -> bytes:
    return read_capped(path, limits.max_trust_root_bytes, f"trust root {path.name}")


def _parse_root(path: Path, version: int, data: bytes, limits: Limits) -> SignedRoot:
    signed = parse_signed_root(data, limits)
    if signed.root.version != version:
        raise FormatError(f"{path} holds trust root v{signed.root.version}")
    return signed


def read_chain(volume_dir: Path, limits: Limits) -> tuple[SignedRoot, ...]:
    """Every root one volume carries, read and parsed, ascending (no trust implied)."""
    return tuple(_parse_root(path, version, _read_root(path, limits), limits)
                 for version, path in list_chain(volume_dir, limits))


def walk_carried_roots(root_files: Iterable[tuple[int, Path]], trusted: TrustRoot,
                       limits: Limits = DEFAULT_LIMITS) -> tuple[SignedRoot, ...]:
    """The carried roots (``(version, path)`` from any number of volumes) from ``trusted``'s
    version up, each read and parsed only once the one before it is trusted and a threshold
    of that one's root keys signed its body (``next_root``): roots no trusted key signed cost
    a signature check, not a parse, and older versions are not read at all. Copies of one
    version must be byte-identical. ``authenticate_manifest`` walks the result again (expiry,
    the same rules), so this only bounds the work done before trust is established."""
    by_version: dict[int, list[Path]] = {}
    for version, path in root_files:
        by_version.setdefault(version, []).append(path)
    chain: list[SignedRoot] = []
    current = trusted
    for version in sorted(v for v in by_version if v >= trusted.version):
        paths = by_version[version]
        data = _read_root(paths[0], limits)
        for other in paths[1:]:
            if _read_root(other, limits) != data:
                raise FormatError(f"volumes carry two different trust roots v{version}")
        if version == trusted.version:
            check_same_root(trusted, version, parse_envelope(data, limits)[0])
            chain.append(_parse_root(paths[0], version, data, limits))
            continue
        signed = next_root(current, data, version, limits)
        chain.append(signed)
        current = signed.root
    return tuple(chain)


def refuse_special(paths: Iterable[Path], what: str) -> None:
    """Each of ``paths`` that exists must be a regular file: ``SpecialFileError`` otherwise,
    decided by ``stat`` alone (a FIFO is never opened). Files read later are checked again
    when opened (``fsutil.open_regular``); this makes ``open_media`` refuse them up front."""
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue  # a missing pack is a TruncatedError when it is needed
        except OSError as e:
            raise MediaError(f"cannot stat {path}: {e}") from e
        if not stat.S_ISREG(mode):
            raise SpecialFileError(f"{what} ({path}) is not a regular file")
