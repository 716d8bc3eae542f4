"""Push one model as a CNCF ModelPack artifact plus its signature referrer.

``store_model(store_dir, "name[:version]")`` and ``media_model(volume_dirs, ...)`` gather what
a push needs (``PushSource``): the signed manifest's exact bytes, its detached signatures,
the trust chain, the model's entry and a reader of each file's plain bytes. ``push(source,
target, tag)`` then uploads, in this order, so a registry never holds a manifest whose blobs
are missing: each file as one raw layer (skipped when the registry has the blob), the
ModelPack config, the model manifest under ``tag``; the media's small files as blobs and the
signature manifest (``subject``: the model manifest) by digest; and, where the far side did
not index the subject itself (Distribution 2.8, layouts), the referrers tag
``sha256-<hex>`` (an index listing every signature referrer of that subject).

Push decides nothing about trust: the receiving host authenticates against its own root.
A push from media still checks the signatures against the media's own carried root (or the
host's, when it has one) and every chunk as it is read, so a damaged disc is not uploaded.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.bundle.media import MANIFEST_NAME, SIGNATURE_SUFFIX, SIGNATURES_DIR, TRUST_DIR
from appliance.bundle.reader import open_media, read_chunk
from appliance.errors import FormatError, ModelNotFoundError, StoreError, UsageError
from appliance.format.manifest import FileEntry, Manifest, ModelEntry, parse_manifest
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot, verify_self_signed
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.oci import mapping
from appliance.oci.mapping import Descriptor
from appliance.oci.targets import Target
from appliance.store import trust_state
from appliance.store.records import parse_ref
from appliance.store.store import Store

PIECE = 4 << 20
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PushSource:
    manifest: Manifest
    manifest_bytes: bytes
    manifest_hash: str
    signatures: tuple[Signature, ...]
    chain: tuple[SignedRoot, ...]
    model: ModelEntry
    read_file: Callable[[FileEntry], Iterator[bytes]]  # the file's plain bytes, in pieces
    origin: str


@dataclass(frozen=True)
class PushResult:
    target: str
    tag: str
    model: str  # name:version
    manifest_digest: str  # the ModelPack artifact
    signature_digest: str  # its signature referrer
    referrers_tag: str | None  # sha256-<hex> when the tag schema was written
    layers: int
    total_bytes: int
    uploaded_bytes: int  # layer bytes sent (blobs the far side lacked)
    seconds: float


def _pick(manifest: Manifest, ref: str | None) -> ModelEntry:
    if ref is None:
        if len(manifest.models) != 1:
            names = ", ".join(f"{m.name}:{m.version}" for m in manifest.models)
            raise UsageError(f"the bundle holds several models ({names}): name one with --model")
        return manifest.models[0]
    name, version = parse_ref(ref)
    found = [m for m in manifest.models if m.name == name
             and (version is None or m.version == version)]
    if len(found) != 1:
        raise UsageError(f"the bundle holds {'no' if not found else 'several'} model {ref!r}")
    return found[0]


def store_model(store_dir: Path, ref: str, limits: Limits = DEFAULT_LIMITS) -> PushSource:
    """A published, verified model of the store, with the manifest it was imported from."""
    with Store(store_dir) as store:
        record = store.find_model(ref)
        if not record.verified:
            raise ModelNotFoundError(f"model {record.ref} is not complete and verified "
                                     f"(state {record.state}); finish its import first")
        found = store.manifest(record.manifest_hash)
    if found is None:
        raise StoreError(f"the store lost manifest {record.manifest_hash} of {record.ref}")
    body, lines = found
    manifest = parse_manifest(body, limits)
    model = manifest.find_model(record.name, record.version)
    if model is None:
        raise StoreError(f"manifest {record.manifest_hash} does not hold {record.ref}")
    locations = {f.path: f.location for f in record.files}

    def read_file(file: FileEntry) -> Iterator[bytes]:
        with locations[file.path].open("rb") as f:
            while piece := f.read(PIECE):
                yield piece

    return PushSource(
        manifest=manifest, manifest_bytes=body, manifest_hash=record.manifest_hash,
        signatures=tuple(Signature.from_bytes(s.encode("ascii"), limits) for s in lines),
        chain=tuple(trust_state.installed_chain(store_dir)), model=model,
        read_file=read_file, origin=f"store {store_dir} model {record.ref}",
    )


def media_model(volume_dirs: Sequence[Path], model_ref: str | None, now: datetime, *,
                store_dir: Path | None = None, limits: Limits = DEFAULT_LIMITS) -> PushSource:
    """One model of a bundle on media (every volume holding its chunks must be given)."""
    media = open_media(volume_dirs, limits)
    root = trust_state.installed_root(store_dir) if store_dir and store_dir.exists() else None
    if root is None:
        if not media.chain:
            raise UsageError("the media carries no trust root to check it against and this "
                             "host has none installed")
        root = verify_self_signed(media.chain[0], now, allow_expired=True)
    bundle = media.authenticate(root, now, allow_expired=True)
    model = _pick(bundle.manifest, model_ref)
    label = f"{model.name}:{model.version}"

    def read_file(file: FileEntry) -> Iterator[bytes]:
        for chunk in file.chunks:
            location = media.locations(chunk.digest)[0]
            yield read_chunk(location, chunk, limits, file=f"{label}/{file.path}")

    return PushSource(
        manifest=bundle.manifest, manifest_bytes=bundle.manifest_bytes,
        manifest_hash=bundle.manifest_hash, signatures=bundle.signatures,
        chain=media.chain, model=model, read_file=read_file,
        origin=f"media {', '.join(map(str, volume_dirs))} model {label}",
    )


def _sha256(pieces: Iterator[bytes]) -> tuple[str, int]:
    hasher, size = hashlib.sha256(), 0
    for piece in pieces:
        hasher.update(piece)
        size += len(piece)
    return "sha256:" + hasher.hexdigest(), size


def _put(target: Target, descriptor: Descriptor, data: bytes) -> None:
    if not target.has_blob(descriptor.digest):
        target.put_blob(descriptor.digest, descriptor.size, lambda: [data])


def push(source: PushSource, target: Target, tag: str, *,
         progress: Progress | None = None) -> PushResult:
    started = time.perf_counter()
    model = source.model
    total = model.size
    done = uploaded = 0
    layers = []
    def report(pieces: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal done
        for piece in pieces:
            yield piece
            done += len(piece)
            if progress is not None:
                progress(done, total)

    for file in model.files:
        digest, size = _sha256(source.read_file(file))
        if size != file.size:
            raise FormatError(f"{source.origin}: {file.path} is {size} bytes, the signed "
                              f"manifest says {file.size}")
        if target.has_blob(digest):
            done += size
            if progress is not None:
                progress(done, total)
        else:
            target.put_blob(digest, size,
                            lambda file=file: report(source.read_file(file)))  # type: ignore[misc]
            uploaded += size
        layers.append(Descriptor(mapping.layer_media_type(file.path), digest, size,
                                 {mapping.FILEPATH: file.path,
                                  mapping.TITLE: file.path.rsplit("/", 1)[-1]}))
    config_bytes = mapping.model_config(source.manifest, model, [d.digest for d in layers])
    config = mapping.blob_descriptor(mapping.MODEL_CONFIG, config_bytes)
    _put(target, config, config_bytes)
    annotations = mapping.bundle_annotations(source.manifest, source.manifest_hash, model)
    model_bytes = mapping.model_manifest(config, layers, annotations)
    target.put_manifest(tag, model_bytes, mapping.OCI_MANIFEST)
    subject = Descriptor(mapping.OCI_MANIFEST, mapping.sha256_digest(model_bytes),
                         len(model_bytes), artifact_type=mapping.MODEL_ARTIFACT)

    small = [(mapping.SIGNED_MANIFEST, MANIFEST_NAME, source.manifest_bytes)]
    small += [(mapping.SIGNATURE, f"{SIGNATURES_DIR}/{s.key_id}{SIGNATURE_SUFFIX}", s.to_bytes())
              for s in source.signatures]
    small += [(mapping.TRUST_ROOT, f"{TRUST_DIR}/root-{r.root.version}.yaml", r.to_bytes())
              for r in source.chain]
    sig_layers = []
    for media_type, title, data in small:
        descriptor = mapping.blob_descriptor(media_type, data, **{mapping.TITLE: title})
        _put(target, descriptor, data)
        sig_layers.append(descriptor)
    _put(target, mapping.EMPTY_CONFIG, mapping.EMPTY_JSON)
    sig_annotations = {k: annotations[k] for k in (mapping.CREATED, mapping.MANIFEST_HASH,
                                                   mapping.CHANNEL, mapping.SEQUENCE)}
    sig_bytes = mapping.signature_manifest(subject, sig_layers, sig_annotations)
    sig_digest = mapping.sha256_digest(sig_bytes)
    indexed = target.put_manifest(sig_digest, sig_bytes, mapping.OCI_MANIFEST)
    tag_schema = None
    if not indexed:
        tag_schema = mapping.referrers_tag(subject.digest)
        _add_to_referrers_tag(target, tag_schema, Descriptor(
            mapping.OCI_MANIFEST, sig_digest, len(sig_bytes), sig_annotations,
            mapping.SIGNATURE_ARTIFACT))
    return PushResult(
        target=target.name, tag=tag, model=f"{model.name}:{model.version}",
        manifest_digest=subject.digest, signature_digest=sig_digest,
        referrers_tag=tag_schema, layers=len(layers), total_bytes=total,
        uploaded_bytes=uploaded, seconds=time.perf_counter() - started,
    )


def _add_to_referrers_tag(target: Target, tag: str, entry: Descriptor) -> None:
    """The distribution-spec 1.1 fallback: an index under ``sha256-<hex>`` listing referrers.
    Read-modify-write: two pushers racing may drop one entry; pushing again restores it."""
    existing = target.get_manifest(tag)
    entries = mapping.parse_index(existing[0], f"referrers tag {tag}") if existing else []
    if any(e.digest == entry.digest for e in entries):
        return
    target.put_manifest(tag, mapping.index([*entries, entry]), mapping.OCI_INDEX)
