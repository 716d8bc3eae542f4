"""Test helpers for bundles: every test bundle is made here, one way for each form.

- On media: ``build(base, ...)`` runs the real builder on a recipe (``write_recipe``) over
  sources in ``base/models`` (``make_sources``) into ``base/media``.
- Without media: ``make_bundle(models)`` is a signed manifest with the bytes it describes
  (``Bundle``), for seeding stores and peers (``peer_helpers.seed``).

Keys come from ``trust_helpers`` (deterministic by name: publishers ``p1``/``p2``, root keys
``r1``..``r3``). ``rewrite_manifest`` plays a publisher gone bad (or a stolen key): it
replaces a bundle's manifest with other bytes, signs them and re-seals every volume index,
so tests can show that the parser still refuses what the signatures allow.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import blake3
from store_helpers import model_entry
from trust_helpers import DAY, NOW, make_root, private, sign_manifest

from appliance.bundle.builder import BuildResult, build_bundle
from appliance.bundle.media import INDEX_NAME, MANIFEST_NAME, SIGNATURES_DIR
from appliance.bundle.reader import find_volume_dirs
from appliance.format.manifest import (
    FORMAT_VERSION,
    Manifest,
    ModelEntry,
    Provenance,
    SourceRecord,
    manifest_bytes,
    manifest_hash,
)
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot, TrustRoot, verify_self_signed

__all__ = ["CHUNK", "NOW", "Bundle", "build", "make_bundle", "make_sources", "model_bytes",
           "rewrite_manifest", "trusted", "write_recipe"]

MIB = 1 << 20
CHUNK = 16 * 1024  # make_bundle's chunk size: small, so a few KiB of data make many chunks


def make_sources(base: Path, gguf: Path | None = None, *, random_mib: int = 9) -> Path:
    """``models/`` with a random (incompressible) file, a text file and optionally a GGUF."""
    models = base / "models"
    models.mkdir(parents=True, exist_ok=True)
    rng = blake3.blake3(b"bundle test data").digest(length=random_mib * MIB)
    (models / "weights.bin").write_bytes(rng)
    (models / "notes.txt").write_bytes(b"line of notes about the model\n" * 20000)
    if gguf is not None:
        (models / "tiny.gguf").write_bytes(gguf.read_bytes())
    return models


def write_recipe(base: Path, *, files: Sequence[str] = ("weights.bin", "notes.txt"),
                 name: str = "acme/tiny", extra_models: str = "", sequence: int = 1,
                 expires_days: int = 30, trust: Sequence[str] = ()) -> Path:
    lines = [
        "channel: site-models",
        f"sequence: {sequence}",
        f"expires_days: {expires_days}",
    ]
    if trust:
        lines.append("trust:")
        lines += [f"  - {t}" for t in trust]
    lines += ["models:", f"  - name: {name}", "    version: q4_k_m", "    license: apache-2.0",
              "    files:"]
    lines += [f"      - path: models/{f}" for f in files]
    recipe = base / "recipe.yaml"
    recipe.write_text("\n".join(lines) + "\n" + extra_models)
    return recipe


def root_file(base: Path, signed: SignedRoot | None = None) -> Path:
    signed = signed or make_root()
    path = base / f"root-{signed.root.version}.yaml"
    path.write_bytes(signed.to_bytes())
    return path


def trusted(signed: SignedRoot | None = None) -> TrustRoot:
    return verify_self_signed(signed or make_root(), NOW)


def build(base: Path, *, keys: Sequence[str] = ("p1",), out: str = "media",
          recipe: Path | None = None, root: SignedRoot | None = None,
          chain: Sequence[SignedRoot] = (), now: datetime | None = NOW, **kwargs: object
          ) -> BuildResult:
    """The one way the tests make a bundle on media: build ``recipe`` (default
    ``write_recipe(base)``) into base/out, signed by ``keys``, carrying ``root`` (default
    ``make_root()``) or the versions in ``chain``, oldest first; ``now=None`` is the real clock.
    """
    recipe = recipe or write_recipe(base)
    roots = [root_file(base, signed) for signed in chain] or [root_file(base, root)]
    return build_bundle(recipe, [private(k) for k in keys], base / out, trust_chain=roots,
                        now=now, **kwargs)  # type: ignore[arg-type]


def rewrite_manifest(media: Path, data: bytes, signers: Sequence[str] = ("p1",)) -> None:
    """Replace the manifest on every volume, sign it, and point every index at it."""
    digest = blake3.blake3(data).digest()
    for volume in find_volume_dirs([media]):
        (volume / MANIFEST_NAME).write_bytes(data)
        sig_dir = volume / SIGNATURES_DIR
        for old in sig_dir.iterdir():
            old.unlink()
        for sig in sign_manifest(data, *signers):
            (sig_dir / f"{sig.key_id}.sig").write_bytes(sig.to_bytes())
        index = bytearray((volume / INDEX_NAME).read_bytes()[:-32])
        struct.pack_into("32s", index, 40, digest)
        (volume / INDEX_NAME).write_bytes(bytes(index) + blake3.blake3(bytes(index)).digest())


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def tree(path: Path) -> dict[str, int]:
    """Every file under ``path`` with its size (for 'nothing else was written' checks)."""
    return {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def sparse_file(path: Path, size: int, *, stride: int = 4 * MIB, noise: int = 64 * 1024) -> None:
    """A big, mostly sparse file whose every ``stride`` block starts with distinct noise."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, stride):
            f.seek(offset)
            length = min(noise, size - offset)
            f.write(blake3.blake3(offset.to_bytes(8, "little")).digest(length=length))
    os.sync()


@dataclass(frozen=True)
class Bundle:
    """A signed manifest and the bytes it describes, without media: what an import or a pull
    would have authenticated. ``peer_helpers.seed`` writes it into a store."""

    manifest: Manifest
    body: bytes
    signatures: tuple[Signature, ...]
    contents: dict[str, dict[str, bytes]]  # model name -> path -> bytes

    @property
    def hash(self) -> str:
        return manifest_hash(self.body)

    @property
    def size(self) -> int:
        return self.manifest.total_bytes


def model_bytes(seed: int, size: int) -> bytes:
    """Deterministic, incompressible-ish bytes (distinct per seed)."""
    return random.Random(seed).randbytes(size)


def make_bundle(
    models: dict[str, dict[str, bytes]],
    *,
    channel: str = "main",
    sequence: int = 1,
    signers: tuple[str, ...] = ("p1",),
    version: str = "1",
    created: datetime = NOW - DAY,
    expires: datetime = NOW + 30 * DAY,
    chunk: int = CHUNK,
) -> Bundle:
    """The one way to a signed bundle without media: ``models`` maps a name to its files'
    bytes, cut into fixed ``chunk``-sized chunks, signed by the publisher keys ``signers``."""
    entries = tuple(_entry(name, version, files, chunk) for name, files in models.items())
    manifest = Manifest(FORMAT_VERSION, channel, sequence, created, expires, entries)
    body = manifest_bytes(manifest)
    return Bundle(manifest, body, tuple(sign_manifest(body, *signers)), models)


def _entry(name: str, version: str, files: dict[str, bytes], chunk: int) -> ModelEntry:
    entry = model_entry(name, version, files, chunk)
    sources = tuple(
        SourceRecord(path, f"test:{name}/{path}", hashlib.sha256(data).hexdigest())
        for path, data in files.items()
    )
    return replace(entry, provenance=Provenance(builder="tests", sources=sources))
