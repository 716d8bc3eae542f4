"""The shared hostile-input field checks: each problem, in each error family, is one class."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from appliance.errors import (
    ApplianceError,
    BadRequestError,
    FormatError,
    LimitExceededError,
    PeerProtocolError,
    RecipeError,
    UnsafePathError,
)
from appliance.format import fields
from appliance.limits import MAX_SEQUENCE


def raises(expected: type[Exception], call: object, *args: object, **kwargs: object) -> str:
    """The exact class ``expected`` (not a subclass) from ``call(*args, **kwargs)``."""
    assert callable(call)
    with pytest.raises(expected) as info:
        call(*args, **kwargs)
    assert type(info.value) is expected
    return str(info.value)


def test_text_bounds_and_control_characters() -> None:
    assert fields.text("ok", "w", 2) == "ok"
    raises(FormatError, fields.text, "", "w", 10)
    raises(FormatError, fields.text, 7, "w", 10)
    raises(LimitExceededError, fields.text, "ééé", "w", 5)  # 6 UTF-8 bytes
    raises(FormatError, fields.text, "two\nlines", "w", 20)
    assert fields.text("two\nlines", "w", 20, control=True) == "two\nlines"
    # Other families raise their own class for every problem.
    raises(RecipeError, fields.text, "x" * 11, "w", 10, error=RecipeError)
    raises(PeerProtocolError, fields.text, "\x1b[2J", "w", 10, error=PeerProtocolError)


def test_names() -> None:
    assert fields.name("gemma3-270m", "w", 64) == "gemma3-270m"
    assert fields.name("acme/tiny", "w", 64, slash=True) == "acme/tiny"
    for bad in ("acme/tiny", ".hidden", "-x", "a b", "x/../y"):
        assert "must be" in raises(UnsafePathError, fields.name, bad, "w", 64)
    raises(UnsafePathError, fields.name, "a//b", "w", 64, slash=True)
    raises(UnsafePathError, fields.name, "aux", "w", 64)  # a device name on Windows shares
    raises(RecipeError, fields.name, "a b", "w", 64, error=RecipeError)
    # A slashed name is one directory in the store ("/" -> "~"): 255 bytes at most in all.
    raises(UnsafePathError, fields.name, "/".join(["a" * 100] * 3), "w", 1024, slash=True)


@pytest.mark.parametrize("path", [
    "/etc/passwd", "C:/x", "a/../b", "./a", "a//b", "a/", "a\\b", "a\x00b", "a/\x7fb",
    "x/" + "a" * 256, "con.txt", "models/LPT1",
])
def test_unsafe_relative_paths(path: str) -> None:
    raises(UnsafePathError, fields.relative_path, path, "w", 4096)


def test_relative_path_limits() -> None:
    ok = "/".join(["a" * 255] * 3)
    assert fields.relative_path(ok, "w", 4096) == ok
    # 255 bytes is NAME_MAX in bytes, not characters: 128 two-byte letters are 256 bytes.
    assert "256 bytes" in raises(UnsafePathError, fields.relative_path, "é" * 128, "w", 4096)
    raises(LimitExceededError, fields.relative_path, "a/" * 600, "w", 1024)
    raises(RecipeError, fields.relative_path, "../x", "w", 1024, error=RecipeError)


def test_integers() -> None:
    assert fields.integer(0, "w") == 0
    raises(FormatError, fields.integer, True, "w")  # YAML true is not 1
    raises(FormatError, fields.integer, 1.0, "w")
    raises(FormatError, fields.integer, -1, "w")
    raises(FormatError, fields.integer, 11, "w", maximum=10)
    raises(LimitExceededError, fields.integer, 11, "w", maximum=10, cap=True)
    raises(PeerProtocolError, fields.integer, 11, "w", maximum=10, cap=True,
           error=PeerProtocolError)
    assert fields.sequence_number(MAX_SEQUENCE, "w") == MAX_SEQUENCE
    raises(LimitExceededError, fields.sequence_number, MAX_SEQUENCE + 1, "w")
    raises(FormatError, fields.sequence_number, 0, "w")
    assert fields.sequence_number(0, "w", minimum=0) == 0


def test_containers_and_keys() -> None:
    value = {"a": 1, "b": 2}
    assert fields.record(value, {"a"}, "w", optional={"b"}) is value
    assert "unknown field(s) b" in raises(FormatError, fields.record, value, {"a"}, "w")
    assert "missing field(s) c" in raises(FormatError, fields.record, value, {"a", "b", "c"},
                                          "w")
    raises(RecipeError, fields.record, [], {"a"}, "w", error=RecipeError)
    assert fields.items([1], "w", max_items=1, nonempty=True) == [1]
    raises(FormatError, fields.items, [], "w", nonempty=True)
    raises(LimitExceededError, fields.items, [1, 2], "w", max_items=1)
    raises(FormatError, fields.items, {"a": 1}, "w")
    raises(FormatError, fields.hex64, "A" * 64, "w")
    assert fields.hex64("a" * 64, "w") == "a" * 64


def test_one_timestamp_form() -> None:
    moment = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    text = fields.format_timestamp(moment)
    assert text == "2026-12-01T09:00:00Z"
    assert fields.parse_timestamp(text, "w") == moment
    assert fields.parse_timestamp(text, "w").tzinfo is UTC
    assert fields.parse_timestamp("2028-02-29T00:00:00Z", "w") == datetime(2028, 2, 29, tzinfo=UTC)
    for bad in ("2026-12-01T09:00:00+00:00", "2026-12-01 09:00:00Z", "2026-13-01T09:00:00Z",
                "2026-12-01T09:00:00.5Z", "2026-02-29T09:00:00Z", "2026-12-31T23:59:60Z",
                "2026-12-01T24:00:00Z", 1764579600):
        raises(FormatError, fields.parse_timestamp, bad, "w")
    raises(PeerProtocolError, fields.parse_timestamp, "never", "w", error=PeerProtocolError)
    with pytest.raises(TypeError):
        fields.format_timestamp(datetime(2026, 12, 1))


# --- JSON from peers, registries and HTTP clients ---------------------------------------------


@pytest.mark.parametrize("error", [FormatError, PeerProtocolError, BadRequestError])
def test_json_object_refuses_with_the_callers_class(error: type[ApplianceError]) -> None:
    assert fields.json_object(b'{"a": [1, {"b": 2}]}', "doc", max_bytes=64, error=error) == {
        "a": [1, {"b": 2}]}
    deep = b'{"a": ' * (fields.MAX_JSON_DEPTH + 1) + b"1" + b"}" * (fields.MAX_JSON_DEPTH + 1)
    scanner_limit = b"[" * 1_000_000 + b"]" * 1_000_000  # RecursionError inside json's scanner
    for bad, match in ((b'{"a": 1, "a": 2}', "repeats the key 'a'"), (deep, "nests deeper"),
                       (scanner_limit, "nests deeper"), (b"\xff{}", "not valid JSON"),
                       (b"{", "not valid JSON"), (b"[1]", "not a JSON object")):
        with pytest.raises(error, match=match):
            fields.json_object(bad, "doc", max_bytes=len(bad), error=error)
    with pytest.raises(LimitExceededError if error is FormatError else error, match="over the cap"):
        fields.json_object(b"{}" + b" " * 64, "doc", max_bytes=64, error=error)
