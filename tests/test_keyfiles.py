"""appliance.keyfiles: key pairs on disk, passphrases, modes, hostile key files."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.errors import KeyFileError, UsageError
from appliance.format.signing import DOMAIN_MANIFEST, public_bytes, sign, verify
from appliance.keyfiles import (
    PASSPHRASE_ENV,
    generate_keypair,
    is_encrypted,
    load_private_key,
    load_public_key,
    new_passphrase_from_env_or_prompt,
    passphrase_from_env_or_prompt,
)

REPO = Path(__file__).resolve().parent.parent
PASS = b"correct horse battery staple"


def test_encrypted_pair_round_trip(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair("alice-root", tmp_path / "keys", PASS)
    assert key_path.name == "alice-root.key" and pub_path.name == "alice-root.pub"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert key_path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert PASS not in key_path.read_bytes()
    assert is_encrypted(key_path)
    private = load_private_key(key_path, PASS)
    public = load_public_key(pub_path)
    assert public_bytes(private) == public and len(public) == 32
    signature = sign(private, DOMAIN_MANIFEST, b"m")
    assert verify(public, DOMAIN_MANIFEST, b"m", signature)


def test_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key_path, pub_path = generate_keypair("k", tmp_path, None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644


def test_unencrypted_pair(tmp_path: Path) -> None:
    key_path, _ = generate_keypair("test", tmp_path, None)
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not is_encrypted(key_path)
    load_private_key(key_path)
    load_private_key(key_path, b"ignored for a plain key")


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    key_path, _ = generate_keypair("k", tmp_path, PASS)
    with pytest.raises(KeyFileError) as exc:
        load_private_key(key_path, b"wrong")
    assert "wrong passphrase" in str(exc.value)
    with pytest.raises(KeyFileError):
        load_private_key(key_path, None)


def test_never_overwrites(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair("k", tmp_path, None)
    before = key_path.read_bytes(), pub_path.read_bytes()
    with pytest.raises(UsageError):
        generate_keypair("k", tmp_path, None)
    pub_path.unlink()
    with pytest.raises(UsageError):  # the .key alone still blocks the name
        generate_keypair("k", tmp_path, None)
    assert key_path.read_bytes() == before[0]


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "x.key", "y.pub", "sp ace",
                                  "n" * 65, "-dash"])
def test_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        generate_keypair(name, tmp_path, None)
    assert list(tmp_path.iterdir()) == []


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        generate_keypair("k", tmp_path, b"")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_hostile_key_files(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair("k", tmp_path, None)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_private = _write(tmp_path / "ec.key", ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ec_public = _write(tmp_path / "ec.pub", ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    garbage = _write(tmp_path / "garbage.key",
                     b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    huge = _write(tmp_path / "huge.pub", b"A" * (64 * 1024 + 1))
    for path in (pub_path, ec_private, garbage, huge, tmp_path / "missing.key", tmp_path):
        with pytest.raises(KeyFileError):
            load_private_key(path)
    for path in (key_path, ec_public, garbage, huge, tmp_path / "missing.pub"):
        with pytest.raises(KeyFileError):
            load_public_key(path)


def test_passphrase_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc, _ = generate_keypair("enc", tmp_path, PASS)
    plain, _ = generate_keypair("plain", tmp_path, None)
    monkeypatch.setenv(PASSPHRASE_ENV, PASS.decode())
    assert passphrase_from_env_or_prompt(plain) is None
    assert passphrase_from_env_or_prompt(enc) == PASS
    assert new_passphrase_from_env_or_prompt("new") == PASS
    monkeypatch.delenv(PASSPHRASE_ENV)
    # pytest's stdin is not a terminal: no prompt, a clear error instead.
    with pytest.raises(KeyFileError):
        passphrase_from_env_or_prompt(enc)
    with pytest.raises(UsageError):
        new_passphrase_from_env_or_prompt("new")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_reads_our_files(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair("k", tmp_path, PASS)
    out = subprocess.run(
        ["openssl", "pkey", "-in", str(key_path), "-passin", f"pass:{PASS.decode()}",
         "-pubout"], capture_output=True, check=True,
    ).stdout
    assert out == pub_path.read_bytes()


def test_no_private_key_is_committed() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    pem = re.compile(
        rb"-----BEGIN (ENCRYPTED |EC |RSA |OPENSSH )?PRIVATE KEY-----\r?\n[A-Za-z0-9+/]"
    )
    found = []
    for name in filter(None, files):
        path = REPO / name.decode()
        if path.is_file() and path.stat().st_size < 8 * 1024 * 1024 and pem.search(
            path.read_bytes()
        ):
            found.append(name.decode())
    assert found == []
