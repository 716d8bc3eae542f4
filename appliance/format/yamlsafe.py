"""YAML for hostile input: size cap, no aliases or anchors, no tags, depth cap, no duplicate keys.

``load`` turns bytes into plain Python values (dict, list, str, int, float, bool, None) or
raises ``FormatError`` (``LimitExceededError`` for the caps). ``dump`` writes the
deterministic form the builder signs: sorted keys, block style, UTF-8, explicit line endings.
Pure: no files.
"""

from __future__ import annotations

from typing import Any

import yaml

from appliance.errors import FormatError, LimitExceededError

try:  # the C loader is much faster on multi-MB manifests
    _BaseLoader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _BaseLoader = yaml.SafeLoader


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


def load(data: bytes, *, max_bytes: int, max_depth: int = 32, what: str = "document") -> Any:
    """Parse untrusted YAML bytes into plain values, or raise FormatError."""
    if len(data) > max_bytes:
        raise LimitExceededError(f"{what} is {len(data)} bytes, over the cap of {max_bytes}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{what} is not UTF-8") from e
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
