"""A CycloneDX 1.6 ML-BOM for a bundle: what a site files for every model it admits.

``bundle_sbom(media, manifest, *, verified) -> str`` turns a bundle's manifest into CycloneDX
1.6 JSON with ``cyclonedx-python-lib`` (the maintained writer; it also carries the schema the
tests validate against). One component per model (type ``machine-learning-model``), with its
licence, its GGUF facts as ``appliance:gguf:*`` properties (the library has no modelCard
writer, and properties are what every BOM consumer reads), and one nested ``file`` component
per model file. A file's SHA-256 comes from the signed provenance (the builder hashes every
upstream file it reads), so it is a real CycloneDX hash; BLAKE3 is no CycloneDX hash
algorithm, so the file's Merkle root (over BLAKE3 chunk digests, the value appliance checks)
goes into ``appliance:merkle-root``. The bundle itself is the BOM's metadata component; its
signers are the metadata's authors (name from the carried trust roots) and
``appliance:signer`` properties (key id, name).

The output is deterministic for one manifest: the serial number is derived from the manifest
hash and the timestamp is the manifest's ``created`` time, so two hosts produce the same BOM.
Whether the signatures were checked is stated (``appliance:verified``), never implied.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.contact import OrganizationalContact
from cyclonedx.output.json import JsonV1Dot6

from appliance import __version__
from appliance.bundle.reader import Media
from appliance.format.manifest import Manifest, ModelEntry, format_timestamp
from appliance.format.trust import TrustRoot

PROPERTY_PREFIX = "appliance:"
# Serial numbers are UUIDv5 of the manifest hash in this namespace: stable across hosts.
_SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:appliance:bundle-manifest")


def _prop(name: str, value: object) -> Property:
    return Property(name=f"{PROPERTY_PREFIX}{name}", value=str(value))


def signer_names(key_ids: Iterable[str], roots: Iterable[TrustRoot]
                 ) -> list[tuple[str, str | None]]:
    """(key id, name) for each signer, named by the newest root that lists it."""
    ordered = sorted(roots, key=lambda r: r.version, reverse=True)
    out = []
    for kid in sorted(set(key_ids)):
        name = next((r.keys[kid].name for r in ordered if kid in r.keys), None)
        out.append((kid, name))
    return out


def _model_component(model: ModelEntry) -> Component:
    props = [_prop("size", model.size), _prop("builder", model.provenance.builder)]
    if model.gguf is not None:
        g = model.gguf
        facts: dict[str, object | None] = {
            "architecture": g.architecture, "quantization": g.quantization,
            "parameter-count": g.parameter_count, "context-length": g.context_length,
            "tensor-count": g.tensor_count, "chat-template-blake3": g.chat_template_hash,
        }
        props += [_prop(f"gguf:{k}", v) for k, v in facts.items() if v is not None]
    sources = {s.path: s for s in model.provenance.sources}
    files = []
    for file in model.files:
        source = sources[file.path]
        files.append(Component(
            type=ComponentType.FILE, name=file.path,
            bom_ref=f"file:{model.name}:{model.version}/{file.path}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=source.sha256)],
            properties=[_prop("size", file.size), _prop("merkle-root", file.merkle_root),
                        _prop("chunks", len(file.chunks)), _prop("source", source.source)],
        ))
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=model.name, version=model.version,
        bom_ref=f"model:{model.name}:{model.version}",
        licenses=[LicenseFactory().make_from_string(model.license)],
        properties=props, components=files,
    )


def bundle_sbom(media: Media, manifest: Manifest, *, verified: bool) -> str:
    """CycloneDX 1.6 JSON for the bundle on ``media`` whose (parsed) manifest is ``manifest``.

    ``verified``: whether ``manifest`` came from ``Media.authenticate`` (stated in the BOM).
    """
    signers = signer_names((s.key_id for s in media.signatures), (s.root for s in media.chain))
    bom = Bom(serial_number=uuid.uuid5(_SERIAL_NAMESPACE, media.manifest_hash))
    bom.metadata.timestamp = manifest.created
    bom.metadata.authors = [OrganizationalContact(name=name or kid) for kid, name in signers]
    bom.metadata.component = Component(
        type=ComponentType.DATA, name=manifest.channel, version=str(manifest.sequence),
        bom_ref=f"bundle:{media.manifest_hash}",
        description=f"appliance signed bundle {manifest.channel} #{manifest.sequence}",
        properties=[
            _prop("manifest-blake3", media.manifest_hash),
            _prop("channel", manifest.channel), _prop("sequence", manifest.sequence),
            _prop("created", format_timestamp(manifest.created)),
            _prop("expires", format_timestamp(manifest.expires)),
            _prop("verified", "true" if verified else "false"),
            _prop("volumes", media.volume_count),
            *([_prop("parity-volumes", len(manifest.parity.volumes))] if manifest.parity
              else []),
            *[_prop("signer", f"{kid} {name or '(in no carried trust root)'}")
              for kid, name in signers],
        ],
    )
    bom.metadata.properties = [_prop("tool", f"appliance {__version__}")]
    models = [_model_component(model) for model in manifest.models]
    for component in models:
        bom.components.add(component)
    bom.register_dependency(bom.metadata.component, models)
    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"
