"""Pure mapping between our signed manifest and OCI / CNCF ModelPack JSON documents.

No files, no sockets: objects in, canonical JSON bytes out, and hostile JSON bytes in,
checked objects out. What goes where is drawn in docs/OCI.md ("Mapping"); in short:

- one ModelPack artifact per model (artifact type
  ``application/vnd.cncf.model.manifest.v1+json``), its config
  (``application/vnd.cncf.model.config.v1+json``) filled from the signed GGUF facts, one
  raw layer per model file, named by ``org.cncf.model.filepath``;
- one signature referrer per model artifact (``subject`` = the model artifact) whose layers
  are the media's own small files: ``manifest.yaml``, ``signatures/<key>.sig``,
  ``trust/root-<N>.yaml``. Nothing in either document is trusted on pull: the signed manifest
  authenticated against the host's root decides, the OCI JSON only says where bytes are.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import FormatError
from appliance.format import fields
from appliance.format.fields import format_timestamp
from appliance.format.manifest import Manifest, ModelEntry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"

# CNCF ModelPack model-spec v1 (github.com/modelpack/model-spec: the spec and config pages).
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"
FILEPATH = "org.cncf.model.filepath"

# Ours: the signature referrer and its layers.
SIGNATURE_ARTIFACT = "application/vnd.appliance.bundle.signature.v1+json"
SIGNED_MANIFEST = "application/vnd.appliance.manifest.v1+yaml"
SIGNATURE = "application/vnd.appliance.signature.v1"
TRUST_ROOT = "application/vnd.appliance.trust-root.v1+yaml"

TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
VERSION = "org.opencontainers.image.version"
LICENSES = "org.opencontainers.image.licenses"
MODEL_NAME = "dev.appliance.model.name"
MODEL_VERSION = "dev.appliance.model.version"
MANIFEST_HASH = "dev.appliance.manifest.blake3"
CHANNEL = "dev.appliance.channel"
SEQUENCE = "dev.appliance.sequence"

# The distribution spec lets registries refuse manifests over 4 MiB; we refuse them too.
MAX_OCI_JSON_BYTES = 4 * 1024 * 1024
MAX_LAYERS = 4096
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_DOC_NAMES = ("license", "readme", "notice", "copying")
_WEIGHT_CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".model", ".tiktoken", ".jinja")
# GGUF file types that are one plain number format (ModelPack's precision table); block
# quantizations (Q4_K_M...) mix several and say so in ``quantization`` instead.
_PRECISION = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}


def canonical_json(value: Any) -> bytes:
    """The one serialisation we push: a digest over it is stable across runs and hosts."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object, what: str) -> str:
    """Only sha256 digests in their canonical form: they also become file names."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise FormatError(f"{what}: {digest!r} is not a sha256 digest")
    return digest


def referrers_tag(digest: str) -> str:
    """The referrers tag schema (distribution-spec 1.1) for registries without the API."""
    return check_digest(digest, "subject").replace(":", "-")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @property
    def title(self) -> str | None:
        return self.annotations.get(TITLE)


def blob_descriptor(media_type: str, data: bytes, **annotations: str) -> Descriptor:
    return Descriptor(media_type, sha256_digest(data), len(data), annotations)


EMPTY_CONFIG = blob_descriptor(OCI_EMPTY, EMPTY_JSON)


def layer_media_type(path: str) -> str:
    """ModelPack's raw layer types, from the file's name (GGUF and anything else: weights)."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.startswith(_DOC_NAMES) or name.endswith((".md", ".txt", ".rst")):
        return DOC_RAW
    if name.endswith(_WEIGHT_CONFIG_SUFFIXES):
        return WEIGHT_CONFIG_RAW
    return WEIGHT_RAW


def param_size(count: int | None) -> str | None:
    """ModelPack's ``<count><scale-prefix>`` with at most one decimal: 268098176 -> 268.1M."""
    if not count:
        return None
    for scale, letter in ((10**15, "Q"), (10**12, "T"), (10**9, "B"), (10**6, "M"),
                          (10**3, "K")):
        if count >= scale:
            value = f"{count / scale:.1f}".removesuffix(".0")
            return f"{value}{letter}"
    return str(count)


def model_config(manifest: Manifest, model: ModelEntry, diff_ids: Sequence[str]) -> bytes:
    """The ModelPack config document of ``model`` (GGUF facts from the signed manifest)."""
    config: dict[str, Any] = {"format": "gguf" if model.gguf else "raw"}
    if model.gguf is not None:
        config["architecture"] = model.gguf.architecture
        size = param_size(model.gguf.parameter_count)
        if size:
            config["paramSize"] = size
        if model.gguf.quantization:
            config["quantization"] = model.gguf.quantization
            precision = _PRECISION.get(model.gguf.quantization.upper())
            if precision:
                config["precision"] = precision
    descriptor: dict[str, Any] = {
        "name": model.name,
        "version": model.version,
        "createdAt": format_timestamp(manifest.created),
        "licenses": [model.license],
    }
    if model.gguf is not None:
        descriptor["family"] = model.gguf.architecture
    sources = [s.source for s in model.provenance.sources]
    if sources:
        descriptor["sourceURL"] = sources[0]
    return canonical_json({
        "descriptor": descriptor,
        "config": config,
        "modelfs": {"type": "layers", "diffIds": list(diff_ids)},
    })


def _manifest(artifact_type: str, config: Descriptor, layers: Sequence[Descriptor],
              annotations: Mapping[str, str], subject: Descriptor | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
        "annotations": dict(annotations),
    }
    if subject is not None:
        doc["subject"] = subject.to_json()
    return canonical_json(doc)


def bundle_annotations(manifest: Manifest, manifest_hash: str, model: ModelEntry
                       ) -> dict[str, str]:
    return {
        CREATED: format_timestamp(manifest.created),
        TITLE: model.name,
        VERSION: model.version,
        LICENSES: model.license,
        MODEL_NAME: model.name,
        MODEL_VERSION: model.version,
        MANIFEST_HASH: manifest_hash,
        CHANNEL: manifest.channel,
        SEQUENCE: str(manifest.sequence),
    }


def model_manifest(config: Descriptor, layers: Sequence[Descriptor],
                   annotations: Mapping[str, str]) -> bytes:
    return _manifest(MODEL_ARTIFACT, config, layers, annotations)


def signature_manifest(subject: Descriptor, layers: Sequence[Descriptor],
                       annotations: Mapping[str, str]) -> bytes:
    return _manifest(SIGNATURE_ARTIFACT, EMPTY_CONFIG, layers, annotations, subject)


def index(manifests: Sequence[Descriptor]) -> bytes:
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": [m.to_json() for m in manifests]})


# -- parsing what a registry or layout hands back (hostile) -----------------------------------


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    return fields.json_object(data, what, max_bytes=MAX_OCI_JSON_BYTES)


def parse_descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise FormatError(f"{what} is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0:
        raise FormatError(f"{what}: mediaType and size are required")
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise FormatError(f"{what}: annotations must map strings to strings")
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise FormatError(f"{what}: artifactType is not a string")
    return Descriptor(media_type, check_digest(digest, what), size, annotations, artifact_type)


@dataclass(frozen=True)
class Artifact:
    """A parsed image manifest: its type, config, layers, subject and annotations."""

    artifact_type: str | None
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    subject: Descriptor | None


def parse_manifest(data: bytes, what: str = "OCI manifest") -> Artifact:
    doc = parse_json(data, what)
    if doc.get("schemaVersion") != 2 or doc.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
        raise FormatError(f"{what} is not an OCI image manifest (schemaVersion 2)")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise FormatError(f"{what}: layers must be a list of at most {MAX_LAYERS}")
    config = parse_descriptor(doc.get("config"), f"{what} config")
    subject = doc.get("subject")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise FormatError(f"{what}: annotations is not an object")
    artifact_type = doc.get("artifactType") or config.media_type
    return Artifact(
        artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        config=config,
        layers=tuple(parse_descriptor(x, f"{what} layer {i}") for i, x in enumerate(layers)),
        annotations={k: v for k, v in annotations.items() if isinstance(v, str)},
        subject=None if subject is None else parse_descriptor(subject, f"{what} subject"),
    )


def parse_index(data: bytes, what: str = "OCI index") -> list[Descriptor]:
    doc = parse_json(data, what)
    manifests = doc.get("manifests")
    if doc.get("schemaVersion") != 2 or not isinstance(manifests, list) \
            or len(manifests) > MAX_LAYERS:
        raise FormatError(f"{what} is not an OCI image index")
    return [parse_descriptor(m, f"{what} entry {i}") for i, m in enumerate(manifests)]


def model_layers(artifact: Artifact) -> dict[str, Descriptor]:
    """File path -> layer of a ModelPack artifact (duplicate paths refused)."""
    if artifact.artifact_type != MODEL_ARTIFACT:
        raise FormatError(f"not a ModelPack model artifact (artifactType "
                          f"{artifact.artifact_type!r}, want {MODEL_ARTIFACT})")
    out: dict[str, Descriptor] = {}
    for layer in artifact.layers:
        path = layer.annotations.get(FILEPATH) or layer.title
        if not path:
            raise FormatError(f"layer {layer.digest} names no file ({FILEPATH})")
        if path in out:
            raise FormatError(f"two layers for file {path!r}")
        out[path] = layer
    return out
