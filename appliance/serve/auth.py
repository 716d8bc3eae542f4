"""Bearer API keys: read from a file, checked in constant time.

The key file holds one key per line; blank lines and lines starting with ``#`` are skipped.
A key must be at least ``MIN_KEY_LENGTH`` printable characters without spaces, so a file
with a typo in it fails at start instead of accepting everyone or no one.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from appliance.errors import UsageError

MIN_KEY_LENGTH = 16
MAX_KEY_FILE_BYTES = 1 << 20


def load_api_keys(path: Path) -> frozenset[str]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read the API key file {path}: {e.strerror}") from e
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise UsageError(f"the API key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"the API key file {path} is not UTF-8 text") from e
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_LENGTH or not key.isprintable() or " " in key:
            raise UsageError(
                f"{path} line {number}: an API key needs at least {MIN_KEY_LENGTH} printable "
                "characters and no spaces"
            )
        keys.add(key)
    if not keys:
        raise UsageError(f"the API key file {path} holds no key")
    return frozenset(keys)


def authorized(header: str | None, keys: frozenset[str]) -> bool:
    """True when ``header`` is ``Bearer <key>`` for one of ``keys`` (always true without keys)."""
    if not keys:
        return True
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    presented = token.strip().encode("utf-8")
    # Compare with every key, without stopping early, so timing says nothing about which.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode("utf-8"))
    return matched
