"""YAML for hostile input: size cap, no aliases or anchors, no tags, depth cap, no duplicate keys,
no byte-order mark, and none of YAML 1.1's surprising plain scalars (yes/no/on/off, hex,
octal and sexagesimal integers, merge keys).

``load`` turns bytes into plain Python values (dict, list, str, int, float, bool, None) or
raises ``FormatError`` (``LimitExceededError`` for the caps). ``dump`` writes the
deterministic form the builder signs: sorted keys, block style, UTF-8, explicit line endings.
Pure: no files.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

import yaml

from appliance.errors import FormatError, LimitExceededError

try:  # the C loader is much faster on multi-MB manifests
    _BaseLoader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _BaseLoader = yaml.SafeLoader


_RESOLVER = yaml.resolver.Resolver()
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)")
_YAML12_OCTAL = re.compile(r"[-+]?0o[0-7]+")
_BOM = b"\xef\xbb\xbf"


def _check_plain_scalar(event: yaml.ScalarEvent, what: str) -> None:
    """Refuse the YAML 1.1 readings a YAML 1.2 or JSON reader would not share.

    ``yes``/``no``/``on``/``off`` (booleans in 1.1, strings in 1.2), hex ``0x1F``, octal
    ``017``, binary ``0b1``, ``1_000`` and sexagesimal ``1:20`` integers, merge keys ``<<``,
    and ``0o17`` (a string to YAML 1.1, an integer to 1.2): a signed document must mean one
    thing to every reader. Quoted, they are strings.
    """
    value = event.value
    # Fast path for the many chunk lines ("<digest> <length>"): none of these forms has a
    # space, and most first characters start no implicit type at all.
    if " " in value or (value[:1] not in _RESOLVER.yaml_implicit_resolvers):
        return
    tag = _RESOLVER.resolve(yaml.ScalarNode, value, (True, False))
    kind = tag.rsplit(":", 1)[-1]
    odd = (
        (kind == "bool" and value not in ("true", "false"))
        or (kind == "int" and not _DECIMAL.fullmatch(value))
        or (kind == "float" and (":" in value or "_" in value))
        or kind in ("merge", "value")
    )
    if _YAML12_OCTAL.fullmatch(value):  # a string to YAML 1.1, an integer to 1.2
        odd, kind = True, "1.2 int"
    if odd:
        line = event.start_mark.line + 1 if event.start_mark else "?"
        raise FormatError(
            f"{what}: {value[:40]!r} at line {line} is a YAML 1.1 oddity ({kind}) other readers "
            "do not share; write a decimal number, true/false, or quote it as a string"
        )


_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_STR_TAG = "tag:yaml.org,2002:str"
_NO_KEY = object()  # a mapping frame waiting for its next key


class _MappingFrame:
    """An open mapping while its events arrive: the items so far and the key waiting for
    its value (``_NO_KEY`` between pairs)."""

    __slots__ = ("items", "key")

    def __init__(self) -> None:
        self.items: dict[Any, Any] = {}
        self.key: Any = _NO_KEY


def _scalar(event: yaml.ScalarEvent, what: str) -> Any:
    """The value of an untagged scalar, as PyYAML's safe loader would construct it."""
    if event.implicit[0] and not event.style:
        _check_plain_scalar(event, what)
    tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag == _STR_TAG:
        return event.value
    node = yaml.ScalarNode(tag, event.value)  # the constructors read only tag and value
    try:
        return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, node)
    except ValueError as e:  # e.g. a timestamp with month 13
        raise FormatError(f"{what}: {event.value[:40]!r} at line {_line(event)}: {e}") from e


def _line(event: yaml.Event) -> int | str:
    return event.start_mark.line + 1 if event.start_mark else "?"


def _build(data: bytes, max_depth: int, what: str) -> Any:
    """Plain values straight from the parser's events, in one pass.

    No node tree: PyYAML's composer keeps a node with two marks per scalar until the whole
    document is built, several hundred bytes each, which for a manifest of 200k chunks was
    over 100 MB. Aliases, anchors and explicit tags are refused as they come, so every node
    is a plain mapping, sequence or implicitly typed scalar.
    """
    root: Any = None
    documents = 0
    stack: list[list[Any] | _MappingFrame] = []  # one frame per open collection
    for event in yaml.parse(data, Loader=_BaseLoader):
        if isinstance(event, yaml.AliasEvent):
            raise FormatError(f"{what}: YAML aliases are not allowed")
        if getattr(event, "anchor", None) is not None:
            raise FormatError(f"{what}: YAML anchors are not allowed")
        # Parser events carry a tag only when the document wrote one explicitly.
        tag = getattr(event, "tag", None)
        if tag is not None:
            raise FormatError(f"{what}: explicit YAML tags are not allowed ({tag})")
        if isinstance(event, yaml.ScalarEvent):
            value = _scalar(event, what)
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= max_depth:
                raise LimitExceededError(f"{what}: YAML nested deeper than {max_depth}")
            stack.append([] if isinstance(event, yaml.SequenceStartEvent) else _MappingFrame())
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            frame = stack.pop()
            value = frame.items if isinstance(frame, _MappingFrame) else frame
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise FormatError(
                    f"{what}: not valid YAML: expected a single document in the stream, "
                    f"found another at line {_line(event)}"
                )
            continue
        else:  # stream start/end, document end
            continue
        if not stack:
            root = value
            continue
        top = stack[-1]
        if not isinstance(top, _MappingFrame):
            top.append(value)
        elif top.key is _NO_KEY:
            if isinstance(value, dict | list):
                raise FormatError(f"{what}: a mapping key at line {_line(event)} is not a scalar")
            if value in top.items:
                raise FormatError(f"{what}: duplicate key {value!r} at line {_line(event)}")
            top.key = value
        else:
            top.items[top.key] = value
            top.key = _NO_KEY
    return root


def _check_utf8(data: bytes, what: str) -> None:
    """UTF-8 or FormatError, decoded in slices so a 32 MiB document is not held twice."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for start in range(0, len(data), 1 << 20):
            decoder.decode(view[start:start + (1 << 20)])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise FormatError(f"{what} is not UTF-8") from e


def load(data: bytes, *, max_bytes: int, max_depth: int = 32, what: str = "document") -> Any:
    """Parse untrusted YAML bytes into plain values, or raise FormatError."""
    if len(data) > max_bytes:
        raise LimitExceededError(f"{what} is {len(data)} bytes, over the cap of {max_bytes}")
    _check_utf8(data, what)
    if _BOM in data:
        # libyaml drops a leading BOM silently: two byte strings, one document. Refused.
        raise FormatError(f"{what}: a byte-order mark is not allowed")
    try:
        return _build(data, max_depth, what)
    except yaml.YAMLError as e:
        raise FormatError(f"{what}: not valid YAML: {e}") from e


def dump(value: Any) -> bytes:
    """Deterministic YAML bytes for signing: sorted keys, block style, no aliases."""

    class _NoAliasDumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    text = yaml.dump(
        value,
        Dumper=_NoAliasDumper,
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 30,
    )
    return text.encode("utf-8")
