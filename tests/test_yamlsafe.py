"""Hostile YAML: caps, aliases, anchors, tags, depth, duplicate keys."""

from __future__ import annotations

import pytest

from appliance.errors import FormatError, LimitExceededError
from appliance.format import yamlsafe


def test_plain_document_loads() -> None:
    assert yamlsafe.load(b"a: 1\nb: [x, y]\n", max_bytes=100) == {"a": 1, "b": ["x", "y"]}


def test_dump_is_deterministic_and_roundtrips() -> None:
    value = {"b": [1, 2], "a": {"z": "text", "y": None}}
    assert yamlsafe.dump(value) == yamlsafe.dump(dict(reversed(list(value.items()))))
    assert yamlsafe.load(yamlsafe.dump(value), max_bytes=1000) == value


def test_size_cap_checked_first() -> None:
    with pytest.raises(LimitExceededError):
        yamlsafe.load(b"a: " + b"x" * 200, max_bytes=100)


def test_billion_laughs_aliases_refused() -> None:
    bomb = b'a: &a ["x","x"]\nb: &b [*a,*a]\nc: [*b,*b]\n'
    with pytest.raises(FormatError, match=r"aliases|anchors"):
        yamlsafe.load(bomb, max_bytes=10_000)


def test_anchor_alone_refused() -> None:
    with pytest.raises(FormatError):
        yamlsafe.load(b"a: &x 1\n", max_bytes=100)


def test_python_tags_refused() -> None:
    with pytest.raises(FormatError):
        yamlsafe.load(b"a: !!python/object/apply:os.system ['true']\n", max_bytes=1000)


def test_depth_cap() -> None:
    deep = b"[" * 50 + b"]" * 50
    with pytest.raises(LimitExceededError):
        yamlsafe.load(deep, max_bytes=1000, max_depth=32)


def test_duplicate_keys_refused() -> None:
    with pytest.raises(FormatError, match="duplicate"):
        yamlsafe.load(b"a: 1\na: 2\n", max_bytes=100)


def test_not_utf8_refused() -> None:
    with pytest.raises(FormatError):
        yamlsafe.load(b"a: \xff\xfe\n", max_bytes=100)


def test_syntax_error_is_format_error() -> None:
    with pytest.raises(FormatError):
        yamlsafe.load(b"a: [1, 2\n", max_bytes=100)
