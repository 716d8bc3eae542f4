"""Test helpers for bundles: recipes in tmp dirs, a trusted root, builds, hostile rewrites.

Keys come from ``trust_helpers`` (deterministic by name: publishers ``p1``/``p2``, root keys
``r1``..``r3``). ``rewrite_manifest`` plays a publisher gone bad (or a stolen key): it
replaces a bundle's manifest with other bytes, signs them and re-seals every volume index,
so tests can show that the parser still refuses what the signatures allow.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import blake3
from trust_helpers import NOW, make_root, private, sign_manifest

from appliance.bundle.builder import BuildResult, build_bundle
from appliance.bundle.media import INDEX_NAME, MANIFEST_NAME, SIGNATURES_DIR
from appliance.bundle.reader import find_volume_dirs
from appliance.format.trust import SignedRoot, TrustRoot, verify_self_signed

__all__ = ["NOW", "build", "make_sources", "rewrite_manifest", "trusted", "write_recipe"]

MIB = 1 << 20


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
