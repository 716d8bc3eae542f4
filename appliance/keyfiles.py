"""Key files on disk: Ed25519 private keys and their public halves.

``NAME.key`` is PKCS#8 PEM, encrypted with a passphrase (``BEGIN ENCRYPTED PRIVATE KEY``)
unless the caller asks for a plain one (test keys); it is created with mode 0600 and never
overwritten. ``NAME.pub`` is the SubjectPublicKeyInfo PEM of the same key, safe to publish.
Both formats are the ones ``openssl pkey`` reads. Every failure is a ``KeyFileError`` (a name
or passphrase the user typed wrong is a ``UsageError``).
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from appliance import fsutil
from appliance.errors import KeyFileError, MissingKeyFileError, UsageError
from appliance.format.signing import public_bytes
from appliance.paths import PASSPHRASE_ENV

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
MAX_KEY_FILE_BYTES = 64 * 1024
_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")
_ENCRYPTED_MARK = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_PRIVATE_MARK = b"PRIVATE KEY-----"


def valid_key_name(name: str) -> bool:
    """Key names become file names and labels in trust roots: short, no path characters."""
    return bool(_NAME_RE.match(name)) and not name.endswith((PRIVATE_SUFFIX, PUBLIC_SUFFIX))


def generate_keypair(name: str, out_dir: Path, passphrase: bytes | None) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.key`` (0600; encrypted unless ``passphrase`` is None) and ``NAME.pub``.

    Refuses (UsageError) to overwrite either file or to use an empty passphrase.
    """
    if not valid_key_name(name):
        raise UsageError(
            f"key name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ @ + -, "
            "starting with a letter or digit"
        )
    if passphrase is not None and not passphrase:
        raise UsageError("the passphrase is empty; pass --unencrypted for a plain test key")
    key_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    pub_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise KeyFileError(f"cannot create {out_dir}: {e}") from e
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path} already exists; pick another name or move it away first")
    private = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase is not None
        else serialization.NoEncryption()
    )
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(key_path, private_pem, PRIVATE_MODE)
    try:
        _write_new(pub_path, public_pem, PUBLIC_MODE)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` from the start (no window where it is 0644)."""
    try:
        fsutil.create_exclusive(path, data, mode)
    except FileExistsError as e:
        raise UsageError(f"{path} already exists; pick another name or move it away first") from e
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e}") from e


def _read(path: Path) -> bytes:
    return fsutil.read_capped(path, MAX_KEY_FILE_BYTES, "key file", error=KeyFileError,
                       missing=MissingKeyFileError, special=KeyFileError,
                              too_big=KeyFileError)


def is_encrypted(path: Path) -> bool:
    return _ENCRYPTED_MARK in _read(path)


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key; ``passphrase`` is ignored for an unencrypted file."""
    data = _read(path)
    if _PRIVATE_MARK not in data:
        raise KeyFileError(f"{path} is not a private key file (a .pub file? a .key is needed)")
    encrypted = _ENCRYPTED_MARK in data
    if encrypted and not passphrase:
        raise KeyFileError(
            f"{path} is encrypted: set {PASSPHRASE_ENV} or run on a terminal to type it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as e:
        reason = "wrong passphrase" if encrypted else "not a readable PEM private key"
        raise KeyFileError(f"cannot load {path}: {reason}") from e
    except (TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"cannot load {path}: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: Path) -> bytes:
    """The raw 32-byte Ed25519 public key from a ``.pub`` (SubjectPublicKeyInfo PEM) file."""
    data = _read(path)
    if _PRIVATE_MARK in data:
        raise KeyFileError(f"{path} is a PRIVATE key; pass its .pub file instead")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return public_bytes(key)


def passphrase_from_env_or_prompt(path: Path) -> bytes | None:
    """For loading: None for a plain key, else $APPLIANCE_PASSPHRASE, else a prompt on a tty."""
    if not is_encrypted(path):
        return None
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode("utf-8")
    if sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for {path}: ").encode("utf-8")
    raise KeyFileError(f"{path} is encrypted: set {PASSPHRASE_ENV} or run on a terminal")


def new_passphrase_from_env_or_prompt(name: str) -> bytes:
    """For generating: $APPLIANCE_PASSPHRASE, else typed twice on a tty (UsageError if neither)."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode("utf-8")
    if not sys.stdin.isatty():
        raise UsageError(
            f"no passphrase for {name}.key: set {PASSPHRASE_ENV}, run on a terminal, "
            "or pass --unencrypted for a test key"
        )
    first = getpass.getpass(f"New passphrase for {name}.key: ")
    if first != getpass.getpass("Repeat the passphrase: "):
        raise UsageError("the two passphrases differ; nothing was written")
    return first.encode("utf-8")


MIN_PASSPHRASE_CHARS = 12
_LONGEST_WORD = 24  # longer runs of letters are words written together, not one word
CEREMONY_ADVICE = (
    "the signing ceremony asks for a long passphrase, six or more random words "
    "(keys/README.md): the key file is only as strong as its passphrase"
)


def passphrase_warning(passphrase: bytes) -> str | None:
    """Why ``passphrase`` is weak (short, or one dictionary-looking word), or None.

    A warning, not a refusal: test keys and site policies differ. What it flags is what a
    guessing attack tries first: under 12 characters, or a single run of letters no longer
    than a dictionary word, with no space, digit or other character in it.
    """
    text = passphrase.decode("utf-8", "replace")
    if len(text) < MIN_PASSPHRASE_CHARS:
        why = f"it is only {len(text)} characters"
    elif text.isalpha() and len(text) <= _LONGEST_WORD:
        why = "it is a single word"
    else:
        return None
    return f"weak passphrase: {why}; {CEREMONY_ADVICE}"


def load_signing_keys(paths: list[Path]) -> list[Ed25519PrivateKey]:
    """CLI helper: load each key, asking for its passphrase only when it is encrypted."""
    return [load_private_key(p, passphrase_from_env_or_prompt(p)) for p in paths]
