"""The builder's signing inputs, and co-signing a bundle that exists.

``load_chain`` reads the trust roots a bundle carries (contiguous versions, one file per
version); ``check_keys_against_root`` refuses a build whose keys the newest carried root
would not count; ``add_signature`` adds one more publisher's signature to every volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import fsutil
from appliance.bundle.media import MANIFEST_NAME, SIGNATURE_SUFFIX, SIGNATURES_DIR
from appliance.bundle.reader import find_volume_dirs
from appliance.errors import FormatError, MediaError, UsageError
from appliance.format.manifest import parse_manifest
from appliance.format.signing import DOMAIN_MANIFEST, Signature, key_id, public_bytes, sign
from appliance.format.trust import SignedRoot, parse_signed_root
from appliance.limits import DEFAULT_LIMITS, Limits


def load_chain(paths: Sequence[Path], limits: Limits) -> list[tuple[SignedRoot, bytes]]:
    chain: dict[int, tuple[SignedRoot, bytes]] = {}
    for path in paths:
        if not path.is_file():
            raise UsageError(f"trust root {path} does not exist")
        data = fsutil.read_capped(path, limits.max_trust_root_bytes, f"trust root {path}")
        try:
            signed = parse_signed_root(data, limits)
        except FormatError as e:
            raise UsageError(f"{path} is not a trust root file: {e}") from e
        version = signed.root.version
        if version in chain and chain[version][1] != data:
            raise UsageError(f"two different trust roots v{version} given")
        chain[version] = (signed, data)
    versions = sorted(chain)
    if versions and versions != list(range(versions[0], versions[-1] + 1)):
        raise UsageError(f"the trust roots to carry have a gap: versions {versions}")
    return [chain[v] for v in versions]


def check_keys_against_root(keys: Sequence[Ed25519PrivateKey],
                             chain: Sequence[tuple[SignedRoot, bytes]]) -> None:
    if not chain:
        return
    newest = chain[-1][0].root
    for key in keys:
        kid = key_id(public_bytes(key))
        if kid not in newest.publisher_role.key_ids:
            raise UsageError(
                f"key {kid} is not a publisher key of trust root v{newest.version} (the "
                "newest root carried), so sites could not count its signature"
            )


def add_signature(media_dir: Path, key: Ed25519PrivateKey,
                  limits: Limits = DEFAULT_LIMITS) -> Signature:
    """Co-sign a bundle: every volume under ``media_dir`` gets ``signatures/<key_id>.sig``.

    The manifest is parsed first (a signer should never sign what it cannot read) and must
    be byte-identical on every volume.
    """
    dirs = find_volume_dirs([media_dir])
    manifests = {fsutil.read_capped(d / MANIFEST_NAME, limits.max_manifest_bytes,
                                    f"manifest of {d}")
                 for d in dirs}
    if len(manifests) != 1:
        raise FormatError(f"the volumes under {media_dir} carry different manifests")
    data = manifests.pop()
    parse_manifest(data, limits)
    signature = sign(key, DOMAIN_MANIFEST, data)
    for d in dirs:
        sig_dir = d / SIGNATURES_DIR
        try:
            sig_dir.mkdir(exist_ok=True)
            fsutil.write_atomic(sig_dir / f"{signature.key_id}{SIGNATURE_SUFFIX}",
                                signature.to_bytes(), sync_dir=False)
            fsutil.fsync_dir(sig_dir, strict=False)
        except OSError as e:
            raise MediaError(f"cannot write a signature into {sig_dir}: {e}") from e
    return signature
