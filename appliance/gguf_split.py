"""Split GGUF models: the shards llama.cpp's gguf-split writes, kept together as one model.

A split GGUF is a set of files ``PREFIX-00001-of-0000N.gguf`` .. ``PREFIX-0000N-of-0000N.gguf``
(what ``llama-gguf-split`` and gguf-py's ``GGUFWriter(split_max_tensors=..)`` write). Each shard
is a complete GGUF carrying ``split.no`` (0-based), ``split.count`` and ``split.tensors.count``
(tensors over every shard); the first shard holds the model's metadata, the others only those
keys and their tensors. llama.cpp is given the first shard and opens the others *by name* from
the same directory (``llama_split_path``), so the names are part of the model: a shard that is
renamed, moved to another directory or left out makes the model unloadable.

This module owns the rules that keep such a model whole:

- ``parse_shard_name`` / ``shard_name``: llama.cpp's naming rule, in both directions;
- ``find_split`` (pure, for the server): which of a model's files form its split GGUF, in
  shard order, and which shards its file list lacks;
- ``split_model_facts`` (for the builder): reads every shard's header, refuses a set llama.cpp
  could not load (a shard missing, misnamed, in another directory, from another split) with a
  ``RecipeError``, and returns the model's facts over the whole set;
- ``split_identity`` (pure): one identity hash for a model served from several files.

A model holds at most one split GGUF; the store publishes its shards side by side under
their manifest paths, which is all llama.cpp needs to find them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import blake3

from appliance.errors import RecipeError
from appliance.gguf_layout import (
    FIXED_HEADER_BYTES,
    GgufFacts,
    GgufLayout,
    is_gguf,
    quantization_name,
    read_gguf_layout,
)
from appliance.limits import DEFAULT_LIMITS, Limits

# llama.cpp's llama_split_path writes "%s-%05d-of-%05d.gguf" with a 1-based index, and
# llama_split_prefix accepts the first shard's name only in exactly that form.
_SHARD_NAME = re.compile(r"(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf")
_IDENTITY_DOMAIN = b"appliance split-gguf identity v1\n"


@dataclass(frozen=True)
class ShardName:
    """What a shard's path says: its directory (posix, "" at the top), prefix and place."""

    directory: str
    prefix: str
    index: int  # 1-based, as in the name
    count: int

    @property
    def key(self) -> tuple[str, str, int]:
        return self.directory, self.prefix, self.count

    def sibling(self, index: int) -> str:
        """The path of shard ``index`` (1-based) of the same set."""
        name = shard_name(self.prefix, index, self.count)
        return f"{self.directory}/{name}" if self.directory else name


def shard_name(prefix: str, index: int, count: int) -> str:
    """The file name llama.cpp looks for: shard ``index`` (1-based) of ``count``."""
    return f"{prefix}-{index:05d}-of-{count:05d}.gguf"


def parse_shard_name(path: str) -> ShardName | None:
    """The shard a relative posix ``path`` names, or None when it is not a shard's name."""
    pure = PurePosixPath(path)
    match = _SHARD_NAME.fullmatch(pure.name)
    if match is None:
        return None
    index, count = int(match["index"]), int(match["count"])
    if count < 2 or not 1 <= index <= count:
        return None
    directory = "" if str(pure.parent) == "." else str(pure.parent)
    return ShardName(directory, match["prefix"], index, count)


@dataclass(frozen=True)
class SplitSet:
    """A model's split GGUF as its file list names it."""

    first: ShardName
    paths: tuple[str, ...]  # the shards present, in shard order; paths[0] is the first shard
    missing: tuple[str, ...]  # the shards the file list lacks


def find_split(paths: Sequence[str]) -> SplitSet | None:
    """The split GGUF among a model's file ``paths`` (manifest paths), by name.

    None when no path names a shard. When names of several sets appear, the set of the first
    shard-named path wins (the builder never makes such a model; the server refuses what is
    missing from the one it loads).
    """
    named = [(p, s) for p in paths if (s := parse_shard_name(p)) is not None]
    if not named:
        return None
    key = named[0][1].key
    by_index = {s.index: p for p, s in named if s.key == key}
    first = named[0][1]
    present = tuple(by_index[i] for i in sorted(by_index))
    missing = tuple(first.sibling(i) for i in range(1, first.count + 1) if i not in by_index)
    return SplitSet(first=replace(first, index=1), paths=present, missing=missing)


def split_identity(parts: Sequence[tuple[str, str]]) -> str:
    """One BLAKE3 identity for a split model from each shard's (path, whole-file BLAKE3 hex),
    in shard order: it changes when any shard does (docs/FORMAT.md, "Split GGUF")."""
    hasher = blake3.blake3(_IDENTITY_DOMAIN)
    for path, digest in parts:
        hasher.update(f"{path}\0{digest}\n".encode())
    return hasher.hexdigest()


def split_model_facts(files: Sequence[tuple[str, Path]], *,
                      limits: Limits = DEFAULT_LIMITS) -> GgufFacts | None:
    """For the builder: the facts of the model whose ``files`` are (path in the bundle, local
    file), when they hold a split GGUF; None when no file is a shard.

    Every GGUF file's header is read (a shard is known by its ``split.*`` keys, whatever its
    name). ``RecipeError`` when llama.cpp could not load the set: a shard misnamed or in
    another directory, shards missing, two split GGUFs in one model, or tensors that do not
    add up to ``split.tensors.count`` (a shard from another split); and for a file named like
    a shard that is not one (the server would look for its siblings).
    """
    found: list[tuple[str, ShardName | None, GgufLayout]] = []
    for dest, local in files:
        try:
            small = local.stat().st_size < FIXED_HEADER_BYTES
        except OSError as e:
            raise RecipeError(f"cannot read {local}: {e.strerror or e}") from e
        layout = None if small or not is_gguf(local) else read_gguf_layout(local, limits=limits)
        if layout is not None and layout.split is not None:
            found.append((dest, parse_shard_name(dest), layout))
        elif parse_shard_name(dest) is not None:
            # The server finds a split GGUF by its names, as llama.cpp finds the siblings.
            raise RecipeError(f"{dest} is named like a shard of a split GGUF but is not one "
                              "(no split.count above 1): give it another dest:")
    if not found:
        return None
    shards: list[tuple[str, ShardName, GgufLayout]] = []
    for dest, name, layout in found:
        assert layout.split is not None
        place = (layout.split.index + 1, layout.split.count)
        if name is None or (name.index, name.count) != place:
            # Suggest the name of the set the other shards already name, if one does.
            prefix = next((n.prefix for _, n, _ in found if n is not None and n is not name),
                          PurePosixPath(dest).name.removesuffix(".gguf"))
            raise RecipeError(
                f"{dest} is shard {place[0]} of {place[1]} of a split GGUF, and llama.cpp "
                f"finds shards by name: give it dest: {shard_name(prefix, *place)}")
        shards.append((dest, name, layout))
    keys = {name.key for _, name, _ in shards}
    if len(keys) > 1:
        listed = ", ".join(sorted({name.sibling(1) for _, name, _ in shards}))
        raise RecipeError(f"a model holds one split GGUF, these files belong to several: "
                          f"{listed} (give each its own model)")
    first_name = shards[0][1]
    held = {name.index for _, name, _ in shards}
    missing = [first_name.sibling(i) for i in range(1, first_name.count + 1) if i not in held]
    if missing:
        raise RecipeError(f"the split GGUF {first_name.sibling(1)} lacks "
                          f"{len(missing)} of its {first_name.count} shards: "
                          f"{', '.join(missing)} (list every shard in the model's files)")
    return _whole_facts([layout for _, _, layout in sorted(shards, key=lambda s: s[1].index)],
                        first_name.sibling(1))


def _whole_facts(layouts: Sequence[GgufLayout], label: str) -> GgufFacts:
    """The first shard's facts, with tensors, parameters and quantization over every shard."""
    first = layouts[0].facts
    assert first is not None  # shard 1 has facts, or read_gguf_layout refused it
    declared = {layout.split.tensor_count for layout in layouts if layout.split is not None}
    held = sum(len(layout.boundaries.tensors) for layout in layouts)
    if declared != {held}:
        raise RecipeError(f"the shards of {label} hold {held} tensors, their split.tensors.count"
                          f" says {', '.join(str(d) for d in sorted(declared))} (a shard from"
                          " another split?)")
    parameters = 0
    bytes_by_type: dict[str, int] = {}
    for layout in layouts:
        for tensor in layout.boundaries.tensors:
            parameters += math.prod(tensor.shape)
            if len(tensor.shape) >= 2:
                bytes_by_type[tensor.type_name] = (bytes_by_type.get(tensor.type_name, 0)
                                                   + tensor.n_bytes)
    return replace(first, tensor_count=held, parameter_count=parameters,
                   quantization=quantization_name(layouts[0].file_type, bytes_by_type))
