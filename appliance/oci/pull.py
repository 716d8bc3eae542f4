"""Pull a ModelPack artifact into the store: signature referrer first, then verified chunks.

``pull(store_dir, target, reference, now=...)``:

1. get the model artifact (by tag or digest) and map its layers to file paths (untrusted:
   it only says where bytes are);
2. find its signature referrers (``Target.referrers``: the registry's referrers API, else the
   ``sha256-<hex>`` tag schema), and fetch each one's small blobs (manifest, signatures,
   trust roots; sha256-checked, size-capped);
3. run the one ingest session (``appliance.store.ingest``) with action ``oci-pull``: its
   authenticate step is ``authenticate_manifest`` over the referrer's bytes against THIS
   host's root (chain walk, threshold, scope, expiry), then the channel's rollback mark,
   plan, stage, local copies, and ``LayerSource`` for the rest: each chunk checked on
   arrival, recorded crash-safely, published only when complete. A killed pull resumes: the
   chunks already durable are not fetched again.

A referrer whose subject is not this artifact is ignored; if several are present the first
that authenticates is used, and if none does the first one's refusal is raised (audited by
the session). An artifact with no referrer at all is a ``SignatureError``: unsigned bytes
are never imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.errors import (
    FormatError,
    IntegrityError,
    LimitExceededError,
    RefusalError,
    SignatureError,
    StoreError,
    UsageError,
)
from appliance.format.manifest import ModelEntry
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot, TrustRoot, parse_signed_root
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.oci import mapping
from appliance.oci.mapping import Descriptor
from appliance.oci.source import WORKERS, LayerSource
from appliance.oci.targets import Target
from appliance.store import layout as store_layout
from appliance.store import trust_state
from appliance.store.ingest import IngestOutcome, IngestSession
from appliance.store.staging import DEFAULT_FLUSH_BYTES
from appliance.store.store import Store

Progress = Callable[[int, int], None]
ACTION = "oci-pull"


@dataclass(frozen=True)
class SignedBlobs:
    """What one signature referrer carries, parsed only as far as needed to authenticate."""

    digest: str
    manifest_bytes: bytes
    signatures: tuple[Signature, ...]
    chain: tuple[SignedRoot, ...]


@dataclass(frozen=True)
class OciPullResult:
    source: str
    manifest_digest: str  # the ModelPack artifact
    signature_digest: str  # the referrer that authenticated
    manifest_hash: str  # our signed manifest (BLAKE3)
    channel: str
    sequence: int
    signers: tuple[str, ...]
    model: str
    complete: bool
    published: tuple[str, ...]
    present: tuple[str, ...]
    total_bytes: int
    already_done_bytes: int
    fetched_bytes: int
    local_bytes: int
    seconds: float
    expired_override: bool


def find_signatures(target: Target, subject: str) -> list[Descriptor]:
    """Signature referrers of ``subject``: the referrers API, else the tag schema."""
    found = target.referrers(subject, mapping.SIGNATURE_ARTIFACT)
    if found:
        return found
    tagged = target.get_manifest(mapping.referrers_tag(subject))
    if tagged is None:
        return []
    # Copies by older tools (skopeo 1.9) rewrite the index without ``artifactType``: such an
    # entry is a candidate too, and ``fetch_signed`` checks the manifest it names.
    return [d for d in mapping.parse_index(tagged[0], "referrers tag index")
            if d.media_type == mapping.OCI_MANIFEST
            and d.artifact_type in (mapping.SIGNATURE_ARTIFACT, None)]


def fetch_signed(target: Target, subject: str, descriptor: Descriptor,
                 limits: Limits = DEFAULT_LIMITS) -> SignedBlobs:
    """One referrer's blobs, each capped by its kind before it is read."""
    got = target.get_manifest(descriptor.digest)
    if got is None:
        raise FormatError(f"{target.name} lists referrer {descriptor.digest} but lacks it")
    data = got[0]
    artifact = mapping.parse_manifest(data, f"signature referrer {descriptor.digest}")
    if artifact.artifact_type != mapping.SIGNATURE_ARTIFACT:
        raise FormatError(f"referrer {descriptor.digest} is a {artifact.artifact_type}")
    if artifact.subject is None or artifact.subject.digest != subject:
        raise FormatError(f"referrer {descriptor.digest} does not refer to {subject}")
    caps = {mapping.SIGNED_MANIFEST: limits.max_manifest_bytes,
            mapping.SIGNATURE: limits.max_signature_bytes,
            mapping.TRUST_ROOT: limits.max_trust_root_bytes}
    counts = {mapping.SIGNED_MANIFEST: 1, mapping.SIGNATURE: limits.max_signatures,
              mapping.TRUST_ROOT: limits.max_trust_chain_length}
    manifests: list[bytes] = []
    signatures: list[Signature] = []
    chain: list[SignedRoot] = []
    for layer in artifact.layers:
        cap = caps.get(layer.media_type)
        if cap is None:
            continue  # a layer some later version adds: not ours to judge
        counts[layer.media_type] -= 1
        if counts[layer.media_type] < 0:
            raise LimitExceededError(f"referrer {descriptor.digest}: too many "
                                     f"{layer.media_type} layers")
        if layer.size > cap:
            raise LimitExceededError(f"referrer {descriptor.digest}: {layer.media_type} "
                                     f"layer of {layer.size} bytes, over {cap}")
        blob = target.get_blob(layer.digest, cap)
        if layer.media_type == mapping.SIGNED_MANIFEST:
            manifests.append(blob)
        elif layer.media_type == mapping.SIGNATURE:
            signatures.append(Signature.from_bytes(blob, limits))
        else:
            chain.append(parse_signed_root(blob, limits))
    if not manifests:
        raise FormatError(f"referrer {descriptor.digest} carries no signed manifest")
    return SignedBlobs(descriptor.digest, manifests[0], tuple(signatures),
                       tuple(sorted(chain, key=lambda r: r.root.version)))


def pull(
    store_dir: Path,
    target: Target,
    reference: str,
    *,
    now: datetime,
    allow_expired: bool = False,
    reason: str | None = None,
    progress: Progress | None = None,
    workers: int = WORKERS,
    flush_bytes: int = DEFAULT_FLUSH_BYTES,
    limits: Limits = DEFAULT_LIMITS,
) -> OciPullResult:
    trust_state.require_override_reason(allow_expired, reason)
    got = target.get_manifest(reference)
    if got is None:
        raise UsageError(f"{target.name} has no artifact {reference!r}")
    data, digest = got
    artifact = mapping.parse_manifest(data, f"{target.name} {reference}")
    layers = mapping.model_layers(artifact)
    name = artifact.annotations.get(mapping.MODEL_NAME)
    version = artifact.annotations.get(mapping.MODEL_VERSION)
    if not name:
        raise FormatError(f"{target.name} {reference}: the artifact names no model "
                          f"({mapping.MODEL_NAME})")
    candidates = find_signatures(target, digest)
    if not candidates:
        raise SignatureError(f"{target.name} {reference} ({digest}) has no signature referrer "
                             "carrying a signed manifest: unsigned models are not imported")
    used: list[SignedBlobs] = []

    def authenticate(root: TrustRoot) -> AuthenticatedBundle:
        first: RefusalError | None = None
        for descriptor in candidates:
            try:
                signed = fetch_signed(target, digest, descriptor, limits)
                bundle = authenticate_manifest(signed.manifest_bytes, signed.signatures,
                                               signed.chain, root, now,
                                               allow_expired=allow_expired, limits=limits)
            except RefusalError as e:
                first = first or e
                continue
            used.append(signed)
            return bundle
        assert first is not None
        raise first

    def source(bundle: AuthenticatedBundle) -> LayerSource:
        model = bundle.manifest.find_model(name, version)
        if model is None:
            raise FormatError(f"the signed manifest does not hold {name}:{version}, which "
                              f"{target.name} {reference} says it is")
        for file in model.files:
            layer = layers.get(file.path)
            if layer is None:
                raise IntegrityError(f"{target.name} {reference} has no layer for the signed "
                                     f"file", file=f"{name}:{version}/{file.path}")
            if layer.size != file.size:
                raise IntegrityError(f"layer {layer.digest} is {layer.size} bytes, the signed "
                                     f"file {file.size}", file=f"{name}:{version}/{file.path}")
        chosen.append(model)
        return LayerSource(target, model, layers, workers=workers)

    # The session builds the source (step 2 of appliance.store.ingest) before it reads
    # ``models`` (step 3), so the model the signed manifest holds lands here in time.
    chosen = _ChosenAfterSource()
    result: list[OciPullResult] = []

    def summary(outcome: IngestOutcome) -> dict[str, Any]:
        result.append(_result(target, outcome, digest, used[0].digest, chosen[0]))
        r = result[0]
        return {"manifest": r.manifest_hash, "channel": r.channel, "sequence": r.sequence,
                "source": r.source, "artifact": r.manifest_digest,
                "referrer": r.signature_digest, "model": r.model,
                "status": "complete" if r.complete else "partial",
                "bytes_fetched": r.fetched_bytes, "bytes_local": r.local_bytes,
                "user": trust_state.who()}

    with store_layout.writer_lock(store_dir, "oci pull"), Store(
        store_dir, flush_bytes=flush_bytes
    ) as store:
        session = IngestSession(store, action=ACTION, now=now, allow_expired=allow_expired,
                                reason=reason, progress=progress, limits=limits,
                                context={"registry": target.name, "artifact": digest})
        session.run(authenticate, source, models=chosen,
                    purpose=lambda _b: f"pulling {name}:{version} from {target.name}",
                    summary=summary)
    return result[0]



class _ChosenAfterSource(list[ModelEntry]):
    """The models to ingest, known only once the session authenticated the manifest; read
    before that (a session that planned before building its source), it refuses rather than
    ingest nothing and call it complete."""

    def __iter__(self) -> Iterator[ModelEntry]:
        if not len(self):
            raise StoreError("the ingest session read the models before building the source")
        return super().__iter__()


def _result(target: Target, outcome: IngestOutcome, digest: str, referrer: str,
            model: ModelEntry) -> OciPullResult:
    bundle = outcome.bundle
    return OciPullResult(
        source=target.name, manifest_digest=digest, signature_digest=referrer,
        manifest_hash=bundle.manifest_hash, channel=bundle.manifest.channel,
        sequence=bundle.manifest.sequence, signers=tuple(sorted(bundle.signers)),
        model=f"{model.name}:{model.version}", complete=outcome.complete,
        published=tuple(outcome.published), present=tuple(outcome.present),
        total_bytes=outcome.total_bytes, already_done_bytes=outcome.already_done_bytes,
        fetched_bytes=outcome.source_bytes, local_bytes=outcome.local_bytes,
        seconds=outcome.seconds, expired_override=bundle.expired_override,
    )
