"""The ``ollama:`` recipe source: a model in a local Ollama store, read as hostile input.

A recipe names ``ollama: NAME[:TAG]`` or ``ollama: {model: NAME[:TAG], store: DIR}``; the
store defaults to ``$OLLAMA_MODELS``, else ``~/.ollama/models`` (Ollama's own default). The
entry becomes two files of the model:

- the GGUF (the manifest's model layer), default name ``<model>-<tag>.gguf``, whose upstream
  sha256 is the blob's digest and whose provenance label is
  ``ollama:<host>/<namespace>/<model>:<tag>@sha256:<manifest digest>``;
- the sidecar ``<model>-<tag>.ollama.json`` (``ollama_layout.Sidecar``): the config blob and
  the template, system, params, messages and license layers, verbatim, so they are signed
  and checked like every other byte and ``models export --ollama`` can give them back.

Reading the store trusts nothing in it (``read_model``): the name's parts follow Ollama's
rules (no path can climb out of ``manifests/``), the manifest and the small blobs are read
with caps, special files are refused before they are opened, every blob must have its
declared size and the sha256 its name says (``IntegrityError`` otherwise; the builder checks
the GGUF's as it packs it, through ``ResolvedSource.upstream_sha256``), and layer kinds that
would make the GGUF alone another model are refused (``FormatError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import fsutil
from appliance.bundle.sources import ResolvedSource
from appliance.errors import (
    IntegrityError,
    RecipeError,
    SpecialFileError,
    TruncatedError,
)
from appliance.format import fields
from appliance.format import ollama_layout as ol

if TYPE_CHECKING:
    from appliance.bundle.recipe import FileSpec

KIND = "ollama"
SIDECAR_KIND = "ollama-sidecar"  # made from an ``ollama:`` entry, never written in a recipe
MODELS_ENV = "OLLAMA_MODELS"
_READ_BLOCK = 8 << 20


def default_models_dir() -> Path:
    """Where Ollama keeps its models: ``$OLLAMA_MODELS``, else ``~/.ollama/models``."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


# --- the recipe side -----------------------------------------------------------------------


def recipe_fields(value: object, where: str, base_dir: Path) -> tuple[str, str, str, str]:
    """``(repo, location, revision, default_dest)`` of a FileSpec for ``ollama: ...``: the
    full name without its tag, the store directory ("" for the default), the tag, and the
    GGUF's default name in the bundle."""
    store = ""
    if isinstance(value, dict):
        m = fields.record(value, {"model"}, f"{where} ollama", optional={"store"},
                          error=RecipeError)
        value, raw_store = m["model"], m.get("store")
        if raw_store is not None:
            if not isinstance(raw_store, str) or not raw_store:
                raise RecipeError(f"{where}: ollama store must be a directory path")
            path = Path(raw_store).expanduser()
            store = str(path if path.is_absolute() else base_dir / path)
    name = ol.parse_name(value, where=f"{where} ollama", error=RecipeError)
    return (f"{name.host}/{name.namespace}/{name.model}", store, name.tag,
            f"{name.model}-{name.tag}.gguf")


def with_sidecars(files: tuple[FileSpec, ...]) -> tuple[FileSpec, ...]:
    """Each ``ollama:`` file followed by its sidecar file."""
    out: list[FileSpec] = []
    for spec in files:
        out.append(spec)
        if spec.kind == KIND:
            # The sidecar is JSON: nothing a GGUF-only option (quantize:) applies to.
            unset: dict[str, Any] = {k: None for k in ("quantize", "imatrix")
                                     if hasattr(spec, k)}
            out.append(dataclasses.replace(spec, kind=SIDECAR_KIND,
                                           dest=ol.sidecar_name(spec.dest), **unset))
    return tuple(out)


def spec_name(spec: FileSpec) -> ol.OllamaName:
    assert spec.repo is not None and spec.revision is not None
    host, namespace, model = spec.repo.split("/")
    return ol.make_name(host, namespace, model, spec.revision, error=RecipeError)


def resolve_ollama(spec: FileSpec) -> ResolvedSource:
    """The GGUF blob (``ollama``) or the sidecar file (``ollama-sidecar``) of a spec."""
    store = Path(spec.location) if spec.location else default_models_dir()
    # The builder hashes the GGUF as it packs it and refuses bytes that differ from the
    # upstream digest, so the blob is read once, not twice (its size is checked here).
    model = read_model(store, spec_name(spec), hash_model=False)
    label = f"ollama:{model.name}@{model.manifest_digest}"
    if spec.kind == KIND:
        return ResolvedSource(local_path=model.gguf_path, label=label, dest=spec.dest,
                              upstream_sha256=model.manifest.model_layer.hex)
    return ResolvedSource(local_path=_sidecar_file(model.sidecar), label=f"{label}#sidecar",
                          dest=spec.dest)


_sidecar_dir: tempfile.TemporaryDirectory[str] | None = None


def _sidecar_file(sidecar: ol.Sidecar) -> Path:
    """The sidecar as a file the builder can stream, named by its content; removed when the
    process ends (the builder reads it while it builds)."""
    global _sidecar_dir
    if _sidecar_dir is None:
        _sidecar_dir = tempfile.TemporaryDirectory(prefix="appliance-ollama-")
    data = ol.sidecar_bytes(sidecar)
    path = Path(_sidecar_dir.name) / f"{hashlib.sha256(data).hexdigest()}.json"
    if not path.exists():
        fsutil.write_atomic(path, data, sync_dir=False)
    return path


# --- reading a store -----------------------------------------------------------------------


@dataclass(frozen=True)
class OllamaModel:
    name: ol.OllamaName
    manifest: ol.OllamaManifest
    manifest_digest: str
    gguf_path: Path  # the verified model blob
    sidecar: ol.Sidecar


# Blobs already hashed in this process, by (path, device, inode, size, mtime): a recipe
# resolves each source more than once (OMS signing, then the build), and a GGUF is large.
_verified: dict[tuple[str, int, int, int, int], str] = {}


def read_model(models_dir: Path, name: ol.OllamaName, *, hash_model: bool = True
               ) -> OllamaModel:
    """One model of an Ollama store, every blob checked against its digest (the GGUF's
    size only, without ``hash_model``: for a caller that hashes it as it reads it)."""
    if not models_dir.is_dir():
        raise RecipeError(f"ollama:{name.short}: no Ollama store at {models_dir} (set "
                          f"{MODELS_ENV} or the recipe's store:)")
    manifest_path = models_dir.joinpath(*name.manifest_parts)
    if not manifest_path.exists() and not manifest_path.is_symlink():
        raise RecipeError(f"ollama:{name.short}: not in the Ollama store {models_dir}"
                          f"{_held(models_dir)}")
    data = fsutil.read_capped(manifest_path, ol.MAX_MANIFEST_BYTES, f"Ollama manifest of "
                              f"{name.short}", error=RecipeError)
    manifest = ol.parse_manifest(data, f"Ollama manifest of {name.short}")
    blobs = models_dir / "blobs"
    config = _small_blob(blobs, manifest.config, ol.MAX_CONFIG_BYTES)
    fields.json_object(config, f"config blob {manifest.config.digest}",
                       max_bytes=ol.MAX_CONFIG_BYTES)
    texts = []
    for layer in manifest.text_layers:
        raw = _small_blob(blobs, layer, ol.MAX_TEXT_LAYER_BYTES)
        text = ol.check_text_layer(layer.media_type, raw, f"{layer.media_type} blob "
                                   f"{layer.digest}")
        texts.append(ol.TextLayer(layer.media_type, text))
    gguf = blobs / manifest.model_layer.blob_name
    _check_big_blob(gguf, manifest.model_layer, hash_model)
    digest = ol.digest_of(data)
    sidecar = ol.Sidecar(name, digest, manifest.model_layer.digest, config.decode("utf-8"),
                         tuple(texts))
    return OllamaModel(name, manifest, digest, gguf, sidecar)


def _held(models_dir: Path) -> str:
    found = sorted("/".join(p.relative_to(models_dir / "manifests").parts)
                   for p in models_dir.glob("manifests/*/*/*/*"))[:10]
    return f"; it holds {', '.join(found)}" if found else "; it holds no models"


def _small_blob(blobs: Path, layer: ol.Layer, cap: int) -> bytes:
    path = blobs / layer.blob_name
    data = fsutil.read_capped(path, cap, f"blob {layer.digest}", error=RecipeError,
                              missing=IntegrityError)
    _check_bytes(len(data), layer, path)
    if ol.digest_of(data) != layer.digest:
        raise IntegrityError(f"the blob's sha256 is not the {layer.digest} it is named by",
                             file=str(path))
    return data


def _check_bytes(size: int, layer: ol.Layer, path: Path) -> None:
    if size < layer.size:
        raise TruncatedError(f"blob is {size} bytes, the manifest says {layer.size}",
                             file=str(path), offset=size)
    if size > layer.size:
        raise IntegrityError(f"blob is {size} bytes, the manifest says {layer.size}",
                             file=str(path))


def _check_big_blob(path: Path, layer: ol.Layer, hash_model: bool) -> None:
    fd = fsutil.open_regular(path, f"model blob {layer.digest}", error=RecipeError,
                             missing=IntegrityError, special=SpecialFileError)
    try:
        st = os.fstat(fd)
        _check_bytes(st.st_size, layer, path)
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if not hash_model or _verified.get(key) == layer.digest:
            return
        sha = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while block := f.read(_READ_BLOCK):
                sha.update(block)
    except OSError as e:
        raise RecipeError(f"cannot read model blob {path}: {e}") from e
    finally:
        os.close(fd)
    if "sha256:" + sha.hexdigest() != layer.digest:
        raise IntegrityError(f"the model blob's sha256 is not the {layer.digest} it is named "
                             "by", file=str(path))
    _verified[key] = layer.digest

