"""Field checks for hostile input, shared by every parser of untrusted documents.

The manifest, recipe, trust-root and peer-protocol parsers all check the same kinds of field:
bounded strings, names, relative paths, integers and sequence numbers, lists, mappings with
required and optional keys, hex digests and timestamps. Each check lives here once and takes
the error class its caller raises (``FormatError`` for signed documents, ``RecipeError`` for
recipes, ``PeerProtocolError`` for peer answers). For the ``FormatError`` family the finer
subclasses follow from the kind of problem: a cap exceeded is a ``LimitExceededError``, a
path or name that could escape its directory an ``UnsafePathError``; other families raise
their own class for everything, because a recipe typo and a lying peer need no finer split.

JSON from a peer, a registry or an HTTP client is read once, by ``json_object``: a size cap
first, UTF-8, no key repeated in one object (two parsers must never read two different
documents from the same bytes), no nesting deeper than ``MAX_JSON_DEPTH``, and a JSON object
at the top.

Timestamps have one form everywhere (signed documents, the store's database, ``--json``
output): RFC 3339 in UTC with a ``Z`` and whole seconds, ``2026-12-01T09:00:00Z``
(``format_timestamp`` / ``parse_timestamp``).

Pure: no files, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Set
from datetime import UTC, datetime
from typing import Any

from appliance.errors import ApplianceError, FormatError, LimitExceededError, UnsafePathError
from appliance.limits import MAX_NAME_SEGMENT_BYTES, MAX_SEQUENCE

ErrorClass = type[ApplianceError]
MAX_JSON_DEPTH = 32  # containers inside containers in any JSON we read

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# One name segment: starts with a letter or digit, so "." and ".." and hidden names are out.
SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_NAME = re.compile(SEGMENT)
_SLASHED_NAME = re.compile(rf"{SEGMENT}(?:/{SEGMENT})*")
# Device names Windows (and so FAT/exFAT media mounted there) cannot hold as a file, with or
# without an extension: "aux.gguf" is unusable on a site's Windows share.
_RESERVED = re.compile(r"(?i)(?:con|prn|aux|nul|com[0-9]|lpt[0-9])(?:\..*)?")


def limit_error(error: ErrorClass) -> ErrorClass:
    """The class for an exceeded cap: ``LimitExceededError`` in the FormatError family."""
    return LimitExceededError if issubclass(error, FormatError) else error


def path_error(error: ErrorClass) -> ErrorClass:
    """The class for an unsafe path or name: ``UnsafePathError`` in the FormatError family."""
    return UnsafePathError if issubclass(error, FormatError) else error


# --- strings and names ---------------------------------------------------------------------


def text(value: object, where: str, max_bytes: int, *, error: ErrorClass = FormatError,
         control: bool = False) -> str:
    """A non-empty string of at most ``max_bytes`` UTF-8 bytes; no control characters unless
    ``control`` (a newline in a name or a license would forge lines in a terminal or log)."""
    if not isinstance(value, str) or not value:
        raise error(f"{where}: expected a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise limit_error(error)(f"{where}: longer than {max_bytes} bytes")
    if not control and _CONTROL.search(value):
        raise error(f"{where}: control characters are not allowed")
    return value


def name(value: object, where: str, max_bytes: int, *, slash: bool = False,
         error: ErrorClass = FormatError) -> str:
    """Letters, digits, ``._+-``, starting with a letter or digit; with ``slash``, such
    segments joined by ``/``. Names become directory names, so anything else is a path
    attack (``UnsafePathError`` in the FormatError family)."""
    checked = text(value, where, max_bytes, error=error)
    if not (_SLASHED_NAME if slash else _NAME).fullmatch(checked):
        raise path_error(error)(
            f"{where}: {checked!r} must be "
            + ("segments of " if slash else "")
            + "letters, digits, '.', '_', '+', '-'"
            + (" joined by '/', each" if slash else ",")
            + " starting with a letter or digit"
        )
    segment(checked.replace("/", "~"), where, error=error)
    return checked


def segment(value: str, where: str, *, error: ErrorClass = FormatError) -> str:
    """One path segment a file system can hold: not empty, ``.`` or ``..``, no ``/``, ``\\``,
    NUL or control character, at most ``MAX_NAME_SEGMENT_BYTES`` (255, ext4's NAME_MAX)
    bytes, not a reserved device name."""
    bad = path_error(error)
    if value in ("", ".", ".."):
        raise bad(f"{where}: a path has an empty, '.' or '..' segment")
    if "/" in value or "\\" in value or _CONTROL.search(value):
        raise bad(f"{where}: segment {value!r} has a control character, slash or backslash")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_SEGMENT_BYTES:
        raise bad(f"{where}: a path segment is {size} bytes, file systems hold at most "
                  f"{MAX_NAME_SEGMENT_BYTES}")
    if _RESERVED.fullmatch(value):
        raise bad(f"{where}: {value!r} is a reserved device name on some file systems")
    return value


def relative_path(value: object, where: str, max_bytes: int, *,
                  error: ErrorClass = FormatError) -> str:
    """A safe relative POSIX path: not absolute (nor ``C:``), every segment a ``segment``,
    at most ``max_bytes`` bytes in all."""
    bad = path_error(error)
    if not isinstance(value, str) or not value:
        raise bad(f"{where}: path must be a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise limit_error(error)(f"{where}: path longer than {max_bytes} bytes")
    if _CONTROL.search(value) or "\\" in value:
        raise bad(f"{where}: path {value!r} has a control character or backslash")
    if value.startswith("/") or (len(value) > 1 and value[1] == ":"):
        raise bad(f"{where}: path {value!r} is absolute")
    for part in value.split("/"):
        if part in ("", ".", ".."):
            raise bad(f"{where}: path {value!r} has an empty, '.' or '..' segment")
        segment(part, where, error=error)
    return value


def hex64(value: object, where: str, *, error: ErrorClass = FormatError) -> str:
    """64 lower-case hex digits (a BLAKE3 or SHA-256 digest)."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise error(f"{where}: expected 64 lower-case hex digits")
    return value


# --- numbers -------------------------------------------------------------------------------


def integer(value: object, where: str, *, minimum: int = 0, maximum: int = MAX_SEQUENCE,
            error: ErrorClass = FormatError, cap: bool = False) -> int:
    """An int (never a bool: YAML ``true`` must not pass as 1) in [minimum, maximum].

    With ``cap``, a value over ``maximum`` exceeds a limit (``LimitExceededError`` in the
    FormatError family); without, it is out of range like one below ``minimum``.
    """
    if type(value) is not int:
        raise error(f"{where}: expected an integer from {minimum} to {maximum}, got {value!r}")
    if value < minimum:
        raise error(f"{where}: {value} is below {minimum}")
    if value > maximum:
        if cap:
            raise limit_error(error)(f"{where}: {value} is over the cap of {maximum}")
        raise error(f"{where}: {value} is over {maximum}")
    return value


def sequence_number(value: object, where: str, *, minimum: int = 1,
                    error: ErrorClass = FormatError) -> int:
    """A channel sequence or root version: an int in [minimum, MAX_SEQUENCE] (SQLite INTEGER)."""
    return integer(value, where, minimum=minimum, maximum=MAX_SEQUENCE, error=error, cap=True)


# --- containers ----------------------------------------------------------------------------


def mapping(value: object, where: str, *, error: ErrorClass = FormatError) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error(f"{where}: expected a mapping")
    return value


def items(value: object, where: str, *, max_items: int | None = None, nonempty: bool = False,
          error: ErrorClass = FormatError) -> list[Any]:
    """A list, optionally non-empty and capped at ``max_items`` (a cap, so LimitExceeded)."""
    if not isinstance(value, list):
        raise error(f"{where}: expected a list")
    if nonempty and not value:
        raise error(f"{where}: the list is empty")
    if max_items is not None and len(value) > max_items:
        raise limit_error(error)(f"{where}: {len(value)} items, over the cap of {max_items}")
    return value


def keys(value: Mapping[str, Any], required: Set[str], optional: Set[str], where: str, *,
         error: ErrorClass = FormatError) -> None:
    """Refuse unknown keys, then missing required ones, naming them."""
    present = set(value)
    unknown = present - required - optional
    if unknown:
        raise error(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    missing = required - present
    if missing:
        raise error(f"{where}: missing field(s) {', '.join(sorted(missing))}")


def record(value: object, required: Set[str], where: str, *, optional: Set[str] = frozenset(),
           error: ErrorClass = FormatError) -> dict[str, Any]:
    """A mapping with exactly the ``required`` keys (plus any of ``optional``)."""
    checked = mapping(value, where, error=error)
    keys(checked, required, optional, where, error=error)
    return checked


# --- timestamps ----------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """``2026-12-01T09:00:00Z``: the one timestamp form (RFC 3339, UTC, whole seconds)."""
    if moment.tzinfo is None:
        raise TypeError("timestamps must be timezone-aware datetimes")
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(value: object, where: str, *, error: ErrorClass = FormatError) -> datetime:
    """``YYYY-MM-DDTHH:MM:SSZ`` (UTC, a string) -> an aware datetime."""
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise error(f"{where}: expected a UTC timestamp like 2026-12-01T09:00:00Z, "
                    f"got {value!r}"[:300])
    try:
        # The shape is checked above; fromisoformat reads it as strptime would (the same
        # dates refused) without strptime's first call, 5 ms of locale tables and a regex
        # compile in every command that reads a timestamp.
        return datetime.fromisoformat(value)
    except ValueError as e:
        raise error(f"{where}: {value!r} is not a valid date") from e


def json_object(data: bytes, what: str, *, max_bytes: int,
                error: ErrorClass = FormatError) -> dict[str, Any]:
    """A JSON object from hostile bytes: size cap, UTF-8, unique keys, bounded depth."""
    if len(data) > max_bytes:
        raise limit_error(error)(f"{what} is {len(data)} bytes, over the cap of {max_bytes}")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{what} repeats the key {key!r} in one object (duplicate key)")
            out[key] = value
        return out

    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=unique)
    except RecursionError as e:  # the C scanner gives up at the interpreter's recursion limit
        raise error(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iteratively: no recursion for hostile input to exhaust
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise error(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return value
