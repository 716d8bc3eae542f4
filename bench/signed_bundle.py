"""The set-up the bundle, import and peer benchmarks share: weights, a key, a root, a recipe.

``prepare(ctx, work, ...)`` picks the real gemma3-270m when the run has it (else generated
weights that look quantized: a compressible header, then incompressible bytes), makes a
publisher key and a version-1 trust root it may sign for, and writes a one-model recipe.
``BenchBundle.build(out)`` builds the signed bundle from it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle.builder import BuildResult, build_bundle
from appliance.format.signing import key_id, public_bytes
from appliance.format.trust import TrustKey, TrustRoot, encode_envelope, parse_signed_root
from appliance.format.trust_build import new_root_body, sign_root_body
from appliance.importer import import_media
from appliance.store import trust_state
from bench.harness import BenchContext, Subject

MIB = 1 << 20
_HEADER_PIECE = b"tokenizer.ggml.tokens piece "


@dataclass(frozen=True)
class BenchBundle:
    source: Path  # the model file the recipe names
    label: str  # "gemma3-270m Q4_K_M" or "generated weights"
    size: int
    now: datetime
    publisher: Ed25519PrivateKey
    root_path: Path  # root-1.yaml, carried on the media
    root_bytes: bytes
    root: TrustRoot
    recipe: Path
    files: tuple[Path, ...] = ()  # every model file the recipe names (source first)

    @property
    def fingerprint(self) -> str:
        return self.root.fingerprint

    def child_args(self) -> dict[str, str]:
        """What a ``bench.harness`` child needs to build or check this bundle."""
        return {"recipe": str(self.recipe), "key": self.publisher.private_bytes_raw().hex(),
                "root_path": str(self.root_path), "now": self.now.isoformat()}

    def build(self, out: Path, *, volume_size: int | None = None,
              parity: int = 0) -> BuildResult:
        return build_bundle(self.recipe, [self.publisher], out, trust_chain=[self.root_path],
                            now=self.now, volume_size=volume_size, parity=parity)

    def trust(self, store: Path) -> None:
        """Install this bundle's root as ``store``'s first root (creating the store)."""
        trust_state.install_first_root(store, self.root_bytes, self.fingerprint, self.now)

    def seed_store(self, store: Path, media: Path, *, keep_media: bool = False) -> Path:
        """Build the bundle into ``media``, trust its root in ``store`` and import it there;
        the media is removed afterwards unless ``keep_media``."""
        self.build(media)
        self.trust(store)
        import_media(store, [media], now=self.now)
        if not keep_media:
            shutil.rmtree(media)
        return store


def generated_weights(path: Path, size: int, *, header_mib: int = 0, salt: bytes = b"") -> Path:
    """Quantized-weights look-alike: ``header_mib`` MiB of text-like header, then
    pseudo-random bytes (BLAKE3 of ``salt`` and the offset, so runs repeat exactly)."""
    with path.open("wb") as f:
        header = _HEADER_PIECE * (header_mib * MIB // len(_HEADER_PIECE))
        f.write(header)
        offset = len(header)
        while offset < size:
            n = min(16 * MIB, size - offset)
            f.write(blake3.blake3(salt + offset.to_bytes(8, "little")).digest(length=n))
            offset += n
    return path


def _root(work: Path, publisher: Ed25519PrivateKey, now: datetime) -> tuple[Path, bytes]:
    root_key = Ed25519PrivateKey.generate()
    keys = [TrustKey(key_id(public_bytes(k)), public_bytes(k), name)
            for k, name in ((root_key, "bench-root"), (publisher, "bench-publisher"))]
    body = new_root_body(
        version=1, created=now - timedelta(days=1), expires=now + timedelta(days=30), keys=keys,
        root_keys=[keys[0].key_id], root_threshold=1,
        publisher_models={keys[1].key_id: ("*",)}, publisher_threshold=1,
    )
    data = encode_envelope(body, sign_root_body(body, [root_key]))
    path = work / "root-1.yaml"
    path.write_bytes(data)
    return path, data


def installed_signer(base: Path, store: Path, now: datetime) -> tuple[Ed25519PrivateKey, Path]:
    """A publisher key and the root (``base/root-1.yaml``) that trusts it, installed as
    ``store``'s first root."""
    publisher = Ed25519PrivateKey.generate()
    path, data = _root(base, publisher, now)
    trust_state.install_first_root(store, data, parse_signed_root(data).root.fingerprint, now)
    return publisher, path


def prepare(
    ctx: BenchContext,
    work: Path,
    *,
    generated_mib: tuple[int, int],
    header_mib: int = 0,
    salt: bytes = b"",
    model_when_quick: bool = False,
    subject: Subject | None = None,
) -> BenchBundle:
    """Weights, key, root and recipe under ``work``; ``generated_mib`` = (quick, full) size
    of the generated weights used when the real model is absent (or the run is quick and
    ``model_when_quick`` is False). ``subject``: these model files instead (one recipe
    entry per file: a split GGUF's shards)."""
    work.mkdir(parents=True, exist_ok=True)
    files: tuple[Path, ...] = subject.files if subject is not None else ()
    if subject is not None:
        source, label = subject.files[0], subject.label
    elif ctx.model_path is not None and (model_when_quick or not ctx.quick):
        source, label = ctx.model_path, "gemma3-270m Q4_K_M"
    else:
        size = generated_mib[0 if ctx.quick else 1] * MIB
        source = generated_weights(work / "weights.bin", size, header_mib=header_mib, salt=salt)
        label = "generated weights"
    now = datetime.now(UTC)
    publisher = Ed25519PrivateKey.generate()
    root_path, root_bytes = _root(work, publisher, now)
    recipe = work / "recipe.yaml"
    files = files or (source,)
    recipe.write_text(
        "channel: bench\nsequence: 1\nmodels:\n  - name: bench\n    version: v1\n"
        "    license: bench\n    files:\n" + "".join(f"      - path: {p}\n" for p in files)
    )
    return BenchBundle(
        source=source, label=label, size=sum(p.stat().st_size for p in files), now=now,
        publisher=publisher, root_path=root_path, root_bytes=root_bytes,
        root=parse_signed_root(root_bytes).root, recipe=recipe, files=files,
    )
