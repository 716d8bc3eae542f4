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


def _check_events(data: bytes, max_depth: int, what: str) -> None:
    """Reject aliases, anchors, explicit tags and deep nesting before building anything."""
    depth = 0
    try:
        for event in yaml.parse(data, Loader=_BaseLoader):
            if isinstance(event, yaml.AliasEvent):
                raise FormatError(f"{what}: YAML aliases are not allowed")
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                raise FormatError(f"{what}: YAML anchors are not allowed")
            # Parser events carry a tag only when the document wrote one explicitly.
            tag = getattr(event, "tag", None)
            if tag is not None:
                raise FormatError(f"{what}: explicit YAML tags are not allowed ({tag})")
            if isinstance(event, yaml.ScalarEvent) and event.implicit[0] and not event.style:
                _check_plain_scalar(event, what)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    raise LimitExceededError(f"{what}: YAML nested deeper than {max_depth}")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as e:
        raise FormatError(f"{what}: not valid YAML: {e}") from e


class _NoDuplicatesLoader(_BaseLoader):
    pass


def _construct_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise FormatError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return dict(loader.construct_pairs(node, deep=deep))


_NoDuplicatesLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


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
    _check_events(data, max_depth, what)
    try:
        return yaml.load(data, Loader=_NoDuplicatesLoader)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from e
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
