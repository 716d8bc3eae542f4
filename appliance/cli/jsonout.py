"""The one shape of every ``--json`` output, and the one way it is printed.

Every command's JSON follows these rules (docs/CLI.md, "JSON output"):

- a command that reports on an operation prints an object whose success flag is ``ok``;
- a model is ``{"name", "version"}`` (more fields may follow);
- a key (a signer, a trust-root key) is ``{"key_id", "name", "words"}``, name and words
  null when no trust root at hand lists the key;
- times are RFC 3339 UTC with ``Z`` (``2026-12-01T09:00:00Z``);
- durations are seconds as a number rounded to 3 decimals, in a field named ``seconds``;
- the text is ``json.dumps`` written straight to stdout: rich's console would wrap long
  lines at the terminal width and break the JSON for a reader that splits lines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.format.trust import TrustRoot


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def seconds(value: float) -> float:
    return round(value, 3)


def timestamp(value: str | datetime | None) -> str | None:
    """An ISO 8601 time (``+00:00``, another offset, or a datetime) as RFC 3339 UTC with Z."""
    from appliance.format.fields import format_timestamp
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the store writes UTC
    return format_timestamp(moment)


def model(ref: str) -> dict[str, str]:
    """``name:version`` (as ``ModelRecord.ref`` writes it) as ``{"name", "version"}``."""
    name, _, version = ref.partition(":")
    return {"name": name, "version": version}


def key(key_id: str, roots: Iterable[TrustRoot]) -> dict[str, Any]:
    """A key as the newest of ``roots`` that lists it names it."""
    from appliance.format.signing import fingerprint_words
    for root in sorted(roots, key=lambda r: r.version, reverse=True):
        known = root.keys.get(key_id)
        if known is not None:
            return {"key_id": key_id, "name": known.name, "words": fingerprint_words(known.public)}
    return {"key_id": key_id, "name": None, "words": None}


def signers(key_ids: Iterable[str], roots: Iterable[TrustRoot]) -> list[dict[str, Any]]:
    chain = list(roots)
    return [key(k, chain) for k in sorted(key_ids)]


def times(record: Mapping[str, Any], *fields: str) -> dict[str, Any]:
    """``record`` with the named time fields rewritten by ``timestamp``."""
    out = dict(record)
    for name in fields:
        if name in out:
            out[name] = timestamp(out[name])
    return out
