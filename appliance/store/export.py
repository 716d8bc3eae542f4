"""Exports: a verified model out of the store, for the tools a site already runs.

- ``export_ollama(store, ref, models_dir)`` writes the model into an Ollama model store
  (``~/.ollama/models`` or any ``$OLLAMA_MODELS``): the GGUF as ``blobs/sha256-<hex>``, the
  config, template, system, params, messages and license blobs, then the manifest
  ``manifests/<host>/<namespace>/<model>/<tag>`` (layout: ``appliance.format.ollama_layout``).
  A model that came from Ollama (``ollama:`` in its recipe) carries a sidecar with its
  original layers and name, so it goes back byte for byte, with the manifest digest it had.
  Any other model gets a config made from its GGUF facts and no template layer: Ollama then
  uses the chat template in the GGUF.
- ``export_dir(store, ref, out_dir)`` writes the model's files at their paths under a new
  directory, with ``SHA256SUMS`` in ``sha256sum`` form (``cd DIR && sha256sum -c SHA256SUMS``).

Both refuse a model that is quarantined or changed (``IntegrityError``), and every byte
written is re-hashed on the way against the chunk digests of the signed manifest and the
file's whole BLAKE3 recorded at publish, so what lands outside is what was verified, not
what was on disk a moment before. Crash safety: each file is written under a temporary
name, fsynced, and renamed only when all of it verified. An Ollama store gets its blobs
first and the manifest last, so Ollama never lists a model whose blobs are not all there
(a temporary left by a crash is not a digest name, which Ollama's own prune removes after its
hour of grace);
a ``--dir`` export is assembled in a hidden sibling directory renamed into place at the end
(in an empty directory that exists, perhaps a mount point, inside it, SHA256SUMS moved last).
An existing different manifest or a non-empty directory is a ``UsageError`` (``replace``
overwrites a manifest); an identical earlier export is left as it is (``unchanged``).

Each export is recorded in the audit log (kind ``export``), each refusal too (``refusal``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from appliance import fsutil
from appliance.chunks import check_chunk
from appliance.errors import (
    ApplianceError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    ModelNotFoundError,
    StoreError,
    TruncatedError,
    UsageError,
)
from appliance.format import ollama_layout as ol
from appliance.store import audit, trust_state
from appliance.store.records import FileRecord, ModelRecord, file_chunks, get_model

Progress = Callable[[int, int], None]
SUMS_NAME = "SHA256SUMS"
_TMP_PREFIX = ".appliance-export-"


@dataclass(frozen=True)
class ExportedFile:
    path: str  # relative to the export's target
    size: int
    sha256: str


@dataclass(frozen=True)
class ExportResult:
    model: str  # name:version
    form: str  # "ollama" or "dir"
    target: Path
    files: tuple[ExportedFile, ...]
    ollama_name: str | None = None
    manifest_digest: str | None = None  # sha256:<hex> of the Ollama manifest
    unchanged: bool = False  # the same export was already there
    left_out: tuple[str, ...] = ()  # model files an Ollama store has no place for
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        name, _, version = self.model.partition(":")
        return {
            "ok": True, "model": {"name": name, "version": version}, "form": self.form,
            "target": str(self.target), "ollama_name": self.ollama_name,
            "manifest_digest": self.manifest_digest, "unchanged": self.unchanged,
            "bytes": self.bytes, "left_out": list(self.left_out),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "seconds": round(self.seconds, 3),
        }


# --- verified reading ----------------------------------------------------------------------


class _Meter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def add(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)


def _verified_model(store_dir: Path, ref: str) -> ModelRecord:
    try:
        return get_model(store_dir, ref)
    except ModelNotFoundError:
        raise
    except StoreError as e:  # quarantined, a file missing or resized: it must not leave
        raise IntegrityError(f"model {ref} must not be exported: {e}") from e


def _copy_verified(store_dir: Path, model: ModelRecord, f: FileRecord, out: int | None,
                   meter: _Meter) -> tuple[str, bytes | None]:
    """Read ``f`` chunk by chunk, checking each against the signed manifest and the whole
    against the BLAKE3 recorded at publish; write it to ``out`` (or keep it, when None).
    Returns the sha256 and, when kept, the bytes."""
    label = f"{model.ref}/{f.path}"
    chunks = sorted(file_chunks(store_dir, model, f.path), key=lambda c: c.offset)
    if not f.blake3 or not chunks:
        raise IntegrityError("no signed chunk list or identity hash recorded", file=label)
    sha, whole = hashlib.sha256(), blake3.blake3(max_threads=blake3.blake3.AUTO)
    kept: list[bytes] = []
    fd = fsutil.open_regular(f.location, f"store file {label}", error=IntegrityError)
    try:
        if os.fstat(fd).st_size != f.size:
            raise TruncatedError(f"file is {os.fstat(fd).st_size} bytes, expected {f.size}",
                                 file=label)
        expected = 0
        for chunk in chunks:
            if chunk.offset != expected:
                raise IntegrityError("the chunk list leaves a gap", file=label,
                                     offset=expected)
            data = fsutil.pread_exact(fd, chunk.length, chunk.offset)
            check_chunk(data, chunk.digest, chunk.length, file=label, offset=chunk.offset)
            sha.update(data)
            whole.update(data)
            if out is None:
                kept.append(data)
            else:
                _write_all(out, data)
            expected += chunk.length
            meter.add(len(data))
    finally:
        os.close(fd)
    if expected != f.size or whole.hexdigest() != f.blake3:
        raise IntegrityError("the file differs from its recorded identity", file=label)
    return sha.hexdigest(), (b"".join(kept) if out is None else None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _new_tmp(directory: Path) -> tuple[Path, int]:
    path = directory / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.partial"
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)


def _os_error(e: OSError, target: Path) -> ApplianceError:
    return StoreError(f"cannot write the export at {target}: {e}")


def _audited(store_dir: Path, ref: str, form: str, target: Path,
             work: Callable[[], ExportResult]) -> ExportResult:
    started = time.monotonic()
    try:
        result = work()
    except (IntegrityError, FormatError) as e:
        with contextlib.suppress(ApplianceError, OSError):
            trust_state.audit_refusal(store_dir, "export", e, model=ref, form=form,
                                      target=str(target))
        raise
    seconds = time.monotonic() - started
    audit.append(store_dir, "export", {
        "model": result.model, "form": form, "target": str(target.resolve()),
        "ollama_name": result.ollama_name, "manifest_digest": result.manifest_digest,
        "files": [{"path": f.path, "sha256": f.sha256} for f in result.files],
        "bytes": result.bytes, "unchanged": result.unchanged, "user": trust_state.who(),
    })
    return dataclasses.replace(result, seconds=seconds)


# --- Ollama --------------------------------------------------------------------------------


def export_ollama(store_dir: Path, ref: str, models_dir: Path, *, name: str | None = None,
                  replace: bool = False, progress: Progress | None = None) -> ExportResult:
    """Write the verified model ``ref`` into the Ollama store ``models_dir`` as ``name``
    (default: its Ollama name if it came from Ollama, else ``<name>:<version>``)."""
    return _audited(store_dir, ref, "ollama", models_dir,
                    lambda: _export_ollama(store_dir, ref, models_dir, name, replace, progress))


def default_ollama_name(model: ModelRecord) -> ol.OllamaName:
    """``acme/tiny`` version ``q4_k_m`` -> ``registry.ollama.ai/acme/tiny:q4_k_m``; characters
    Ollama does not allow become ``_``, and a deeper name keeps its last two parts."""
    def clean(part: str, dots: bool) -> str:
        out = "".join(c if c.isascii() and (c.isalnum() or c in "_-" or (dots and c == "."))
                      else "_" for c in part)
        return out[:80]
    parts = model.name.split("/")
    namespace = clean(parts[-2], dots=False) if len(parts) > 1 else ol.DEFAULT_NAMESPACE
    return ol.make_name(ol.DEFAULT_HOST, namespace, clean(parts[-1], True),
                        clean(model.version, True), error=UsageError)


def _gguf_file(model: ModelRecord) -> FileRecord:
    ggufs = [f for f in model.files if f.path.lower().endswith(".gguf")]
    if len(ggufs) != 1:
        raise UsageError(f"model {model.ref} has {len(ggufs)} GGUF files; an Ollama store "
                         "holds one per model (use --dir for the files as they are)")
    return ggufs[0]


def _export_ollama(store_dir: Path, ref: str, models_dir: Path, name: str | None,
                   replace: bool, progress: Progress | None) -> ExportResult:
    model = _verified_model(store_dir, ref)
    gguf = _gguf_file(model)
    sidecar_file = next((f for f in model.files if f.path == ol.sidecar_name(gguf.path)), None)
    meter = _Meter(gguf.size + (sidecar_file.size if sidecar_file else 0), progress)
    sidecar = None
    if sidecar_file is not None:
        if sidecar_file.size > ol.MAX_SIDECAR_BYTES:  # read into memory: cap it first
            raise LimitExceededError(f"{model.ref}/{sidecar_file.path} is {sidecar_file.size} "
                                     f"bytes, over the cap of {ol.MAX_SIDECAR_BYTES}")
        _, raw = _copy_verified(store_dir, model, sidecar_file, None, meter)
        assert raw is not None
        sidecar = ol.parse_sidecar(raw, f"{model.ref}/{sidecar_file.path}")
    target = (ol.parse_name(name, where="--name", error=UsageError) if name
              else sidecar.name if sidecar else default_ollama_name(model))
    left_out = tuple(f.path for f in model.files if f not in (gguf, sidecar_file))
    blobs = models_dir / "blobs"
    manifest_path = models_dir.joinpath(*target.manifest_parts)
    try:
        blobs.mkdir(parents=True, exist_ok=True)
        if not replace:
            _early_conflict(manifest_path, gguf.size, target)
        model_layer = _put_model_blob(store_dir, model, gguf, blobs, replace, meter)
        layers = [model_layer]
        if sidecar is not None:
            for text in sidecar.layers:
                layers.append(_put_small_blob(blobs, text.media_type, text.text.encode(),
                                              replace))
        facts = model.gguf or {}
        if sidecar is not None and sidecar.model_digest == model_layer.digest:
            config_data = sidecar.config.encode()  # the very GGUF it describes
        elif sidecar is not None:  # quantized at build: the config must say what it is now
            config_data = ol.patch_config(sidecar.config, file_type=facts.get("quantization"),
                                          parameter_count=facts.get("parameter_count"))
        else:
            config_data = ol.config_bytes(
                family=str(facts.get("architecture") or ""),
                file_type=str(facts.get("quantization") or ""),
                parameter_count=facts.get("parameter_count"))
        config = _put_small_blob(blobs, ol.CONFIG_MEDIA_TYPE, config_data, replace)
        data = ol.manifest_bytes(ol.OllamaManifest(config, tuple(layers)))
        unchanged = _put_manifest(manifest_path, data, replace, target)
    except OSError as e:
        raise _os_error(e, models_dir) from e
    files = [ExportedFile("/".join(target.manifest_parts), len(data),
                          hashlib.sha256(data).hexdigest())]
    files += [ExportedFile(f"blobs/{layer.blob_name}", layer.size, layer.hex)
              for layer in (config, *layers)]
    return ExportResult(model.ref, "ollama", models_dir, tuple(files), str(target),
                        ol.digest_of(data), unchanged, left_out)


def _put_model_blob(store_dir: Path, model: ModelRecord, gguf: FileRecord, blobs: Path,
                    replace: bool, meter: _Meter) -> ol.Layer:
    tmp, fd = _new_tmp(blobs)
    try:
        try:
            sha, _ = _copy_verified(store_dir, model, gguf, fd, meter)
            os.fsync(fd)
        finally:
            os.close(fd)
        layer = ol.Layer(ol.MODEL_MEDIA_TYPE, f"sha256:{sha}", gguf.size)
        final = blobs / layer.blob_name
        if _same_blob(final, layer, replace):
            tmp.unlink()
        else:
            os.replace(tmp, final)
            fsutil.fsync_dir(blobs, strict=False)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return layer


def _put_small_blob(blobs: Path, media_type: str, data: bytes, replace: bool) -> ol.Layer:
    layer = ol.Layer(media_type, ol.digest_of(data), len(data))
    final = blobs / layer.blob_name
    if not _same_blob(final, layer, replace):
        fsutil.write_atomic(final, data, strict_dir_sync=False)
    return layer


def _same_blob(final: Path, layer: ol.Layer, replace: bool) -> bool:
    """True when ``final`` already holds the blob; a blob of that name with other bytes is
    damage in the Ollama store, replaced only when asked."""
    if not final.exists() and not final.is_symlink():
        return False
    try:
        fd = fsutil.open_regular(final, f"existing blob {final}", error=UsageError)
        try:
            sha = hashlib.sha256()
            while block := os.read(fd, 8 << 20):
                sha.update(block)
        finally:
            os.close(fd)
        if "sha256:" + sha.hexdigest() == layer.digest:
            # Ollama prunes blobs no manifest names once they are an hour old (by mtime); an
            # old orphan reused here must not go before our manifest names it. Ollama
            # touches a layer it reuses for the same reason.
            os.utime(final)
            return True
        problem = "holds other bytes than its name says"
    except FormatError as e:  # a FIFO, a device, a directory in its place
        problem = str(e)
    if replace:
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
        return False
    raise UsageError(f"the Ollama store already has {final}, which {problem}; remove it "
                     "(or export with --replace)")


def _early_conflict(path: Path, size: int, name: ol.OllamaName) -> None:
    """Say before copying gigabytes that the name is taken by a model of another size (the
    same size is decided by the digests once the copy is made)."""
    if not path.is_file():
        return
    try:
        old = ol.parse_manifest(fsutil.read_capped(path, ol.MAX_MANIFEST_BYTES, "manifest",
                                                   error=UsageError))
    except FormatError:
        old = None
    if old is None or old.model_layer.size != size:
        raise UsageError(f"the Ollama store already has a different model named "
                         f"{name.short} ({path}); choose another --name or export with "
                         "--replace")


def _put_manifest(path: Path, data: bytes, replace: bool, name: ol.OllamaName) -> bool:
    """Write the manifest last; True when the same one was there already."""
    if path.exists() or path.is_symlink():
        try:
            old = fsutil.read_capped(path, ol.MAX_MANIFEST_BYTES, "existing manifest",
                                     error=UsageError)
        except FormatError:
            old = None
        if old == data:
            return True
        if not replace:
            raise UsageError(f"the Ollama store already has a different model named "
                             f"{name.short} ({path}); choose another --name or export with "
                             "--replace")
        if path.is_symlink() or not path.is_file():
            raise UsageError(f"{path} is not a regular file; remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(path, data, strict_dir_sync=False)
    return False


# --- plain files ---------------------------------------------------------------------------


def export_dir(store_dir: Path, ref: str, out_dir: Path, *,
               progress: Progress | None = None) -> ExportResult:
    """Write the verified model's files under the new (or empty) directory ``out_dir``,
    with a ``SHA256SUMS`` list."""
    return _audited(store_dir, ref, "dir", out_dir,
                    lambda: _export_dir(store_dir, ref, out_dir, progress))


def _export_dir(store_dir: Path, ref: str, out_dir: Path,
                progress: Progress | None) -> ExportResult:
    model = _verified_model(store_dir, ref)
    if any(f.path == SUMS_NAME for f in model.files):
        raise UsageError(f"model {model.ref} has a file named {SUMS_NAME}, the checksum "
                         "list's name; export it with --ollama or copy it by hand")
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir()
                                                      or any(out_dir.iterdir()))):
        raise UsageError(f"--dir {out_dir} exists and is not an empty directory; give a new "
                         "one (an export never mixes with other files)")
    if not out_dir.parent.is_dir():
        raise UsageError(f"the parent of --dir {out_dir} does not exist")
    # A new directory is assembled beside it and renamed into place whole. An empty one that
    # exists may be a mount point (a USB disk): rename onto it fails and its parent is another
    # file system, so the files are assembled inside it and moved up, SHA256SUMS last.
    inside = out_dir.is_dir()
    work = (out_dir if inside else out_dir.parent) / (
        f"{_TMP_PREFIX}{out_dir.name}-{secrets.token_hex(4)}")
    meter = _Meter(model.size, progress)
    files = []
    try:
        work.mkdir()
        for f in model.files:
            target = work.joinpath(*f.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            try:
                sha, _ = _copy_verified(store_dir, model, f, fd, meter)
                os.fsync(fd)
            finally:
                os.close(fd)
            files.append(ExportedFile(f.path, f.size, sha))
        # Two spaces: sha256sum's text-mode line, which every coreutils and busybox reads.
        sums = "".join(f"{f.sha256}  {f.path}\n" for f in files).encode()
        fsutil.write_atomic(work / SUMS_NAME, sums, strict_dir_sync=False)
        for directory in sorted({p.parent for p in work.rglob("*")},
                                key=lambda d: len(d.parts), reverse=True):
            fsutil.fsync_dir(directory, strict=False)
        if inside:
            tops = [*sorted({f.path.split("/")[0] for f in files}), SUMS_NAME]
            for top in tops:  # the checksum list last: it says the export is whole
                os.rename(work / top, out_dir / top)
            work.rmdir()
            fsutil.fsync_dir(out_dir, strict=False)
        else:
            os.rename(work, out_dir)  # onto nothing: atomic
            fsutil.fsync_dir(out_dir.parent, strict=False)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise _os_error(e, out_dir) from e
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(model.ref, "dir", out_dir, tuple(files))

