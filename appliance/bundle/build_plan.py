"""The builder's plan: every source resolved, cut into chunk spans, and the room it needs.

``plan_recipe`` resolves each file of a recipe (``appliance.bundle.sources``), checks its size
and chunk count against the caps, and plans its GGUF-aware spans (``appliance.chunker``); a
split GGUF's facts are the whole set's, on its first shard. ``volume_reserve`` is the room
each volume keeps for files other than packs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.bundle.recipe import Recipe
from appliance.bundle.sources import ResolvedSource, resolve_source
from appliance.chunker import Span, plan_file
from appliance.errors import RecipeError
from appliance.format.manifest import GgufInfo
from appliance.gguf_layout import GgufFacts
from appliance.gguf_split import split_model_facts
from appliance.limits import MAX_CHUNK_BYTES, TARGET_CHUNK_BYTES, Limits, MiB

# Room kept free on each volume for files other than packs. Removable media round every file
# up to a cluster (FAT32/exFAT: up to 128 KiB), and co-signers add signature files later.
_CLUSTER = 128 * 1024
_SIGNATURE_SLOTS = 32
_MANIFEST_BYTES_PER_CHUNK = 90
_INDEX_BYTES_PER_CHUNK = 49


@dataclass
class PlannedFile:
    source: ResolvedSource
    spans: list[Span]
    size: int
    gguf: GgufInfo | None


def _gguf_info(facts: GgufFacts | None) -> GgufInfo | None:
    if facts is None:
        return None
    return GgufInfo(
        architecture=facts.architecture, quantization=facts.quantization,
        parameter_count=facts.parameter_count, context_length=facts.context_length,
        tensor_count=facts.tensor_count, chat_template_hash=facts.chat_template_hash,
    )


def plan_recipe(recipe: Recipe, limits: Limits, scratch: Path | None = None,
          notify: Callable[[str], None] | None = None) -> list[list[PlannedFile]]:
    planned = []
    for model in recipe.models:
        files = []
        for spec in model.files:
            source = resolve_source(spec, scratch=scratch, notify=notify)
            try:
                size = source.local_path.stat().st_size
            except OSError as e:
                raise RecipeError(f"cannot read {source.local_path}: {e}") from e
            if size > limits.max_file_bytes:
                raise RecipeError(f"{source.local_path} is over the file size cap")
            plan = plan_file(source.local_path, target=TARGET_CHUNK_BYTES,
                             maximum=MAX_CHUNK_BYTES, limits=limits)
            if len(plan.spans) > limits.max_chunks_per_file:
                raise RecipeError(
                    f"{source.local_path} needs {len(plan.spans)} chunks, over the cap")
            files.append(PlannedFile(source, list(plan.spans), size, _gguf_info(plan.facts)))
        whole = split_model_facts([(f.source.dest, f.source.local_path) for f in files],
                                  limits=limits)
        if whole is not None:  # a split GGUF: the model's facts are the whole set's
            for planned_file in files:
                planned_file.gguf = None
            files[0].gguf = _gguf_info(whole)
        planned.append(files)
    return planned


def volume_reserve(planned: list[list[PlannedFile]], chain_bytes: int, keys: int,
                    pack_size: int, volume_size: int) -> int:
    chunks = sum(len(f.spans) for files in planned for f in files)
    files = sum(len(files) for files in planned)
    manifest = 64 * 1024 + files * 4096 + chunks * _MANIFEST_BYTES_PER_CHUNK
    index = 4096 + chunks * _INDEX_BYTES_PER_CHUNK
    small_files = 4 + max(keys, _SIGNATURE_SLOTS) + len(planned) + volume_size // pack_size
    return manifest + index + chain_bytes + small_files * _CLUSTER + 1 * MiB
