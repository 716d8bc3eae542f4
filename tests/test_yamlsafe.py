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


@pytest.mark.parametrize("scalar", [
    "yes", "No", "on", "OFF", "Yes", "0x1F", "017", "0o17", "0b101", "1_000", "1:20",
    "-1:20:30", "+12", "1:20.5", "1_0.5",
])
def test_yaml_1_1_oddities_are_refused(scalar: str) -> None:
    """Values YAML 1.1 (PyYAML) reads as bool or int but YAML 1.2 and JSON readers do not."""
    for doc in (f"a: {scalar}\n", f"{scalar}: 1\n", f"- {scalar}\n"):
        with pytest.raises(FormatError, match=r"YAML 1\.1") as info:
            yamlsafe.load(doc.encode(), max_bytes=100)
        assert type(info.value) is FormatError
    # Quoted, each is an ordinary string.
    assert yamlsafe.load(f'a: "{scalar}"\n'.encode(), max_bytes=100) == {"a": scalar}


def test_merge_keys_are_refused() -> None:
    with pytest.raises(FormatError, match="merge"):
        yamlsafe.load(b"a:\n  <<: {b: 1}\n  c: 2\n", max_bytes=100)


def test_plain_forms_every_reader_shares_still_load() -> None:
    doc = b"a: 12\nb: -3\nc: 0\nd: true\ne: false\nf: null\ng: 1.5\nh: text\ni: 0.25\n"
    assert yamlsafe.load(doc, max_bytes=200) == {
        "a": 12, "b": -3, "c": 0, "d": True, "e": False, "f": None, "g": 1.5, "h": "text",
        "i": 0.25,
    }


def test_dump_never_writes_an_oddity() -> None:
    value = {"yes": "no", "n": ["0x1F", "017", "1:20", "on", "<<"], "k": 7}
    assert yamlsafe.load(yamlsafe.dump(value), max_bytes=1000) == value


@pytest.mark.parametrize("where", [0, 5])
def test_byte_order_mark_is_refused(where: int) -> None:
    doc = b"a: 1\nb: 2\n"
    with pytest.raises(FormatError, match="byte-order mark") as info:
        yamlsafe.load(doc[:where] + b"\xef\xbb\xbf" + doc[where:], max_bytes=100)
    assert type(info.value) is FormatError
