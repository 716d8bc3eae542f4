"""Ed25519 signing with domain separation, key ids and the detached signature format."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.errors import SignatureError
from appliance.format import signing


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_sign_verify_roundtrip(key: Ed25519PrivateKey) -> None:
    sig = signing.sign(key, signing.DOMAIN_MANIFEST, b"manifest bytes")
    public = signing.public_bytes(key)
    assert signing.verify(public, signing.DOMAIN_MANIFEST, b"manifest bytes", sig)


def test_signature_for_one_domain_does_not_verify_in_another(key: Ed25519PrivateKey) -> None:
    sig = signing.sign(key, signing.DOMAIN_MANIFEST, b"doc")
    assert not signing.verify(signing.public_bytes(key), signing.DOMAIN_ROOT, b"doc", sig)


def test_changed_message_fails(key: Ed25519PrivateKey) -> None:
    sig = signing.sign(key, signing.DOMAIN_MANIFEST, b"doc")
    assert not signing.verify(signing.public_bytes(key), signing.DOMAIN_MANIFEST, b"dob", sig)


def test_other_key_fails_even_with_forged_key_id(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    sig = signing.sign(other, signing.DOMAIN_MANIFEST, b"doc")
    forged = signing.Signature(key_id=signing.key_id(signing.public_bytes(key)),
                               signature=sig.signature)
    assert not signing.verify(signing.public_bytes(key), signing.DOMAIN_MANIFEST, b"doc", forged)


def test_signature_text_roundtrip(key: Ed25519PrivateKey) -> None:
    sig = signing.sign(key, signing.DOMAIN_ROOT, b"x")
    assert signing.Signature.from_bytes(sig.to_bytes()) == sig


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"appliance-sig-v2 " + b"a" * 32 + b" AAAA",
        b"appliance-sig-v1 NOTHEX" + b" AAAA",
        b"appliance-sig-v1 " + b"a" * 32 + b" !!!notbase64",
        b"appliance-sig-v1 " + b"a" * 32 + b" AAAA",  # decodes, but not 64 bytes
        b"\xff\xfe",
        b"x" * 10_000,
    ],
)
def test_malformed_signature_files_are_refused(data: bytes) -> None:
    with pytest.raises(SignatureError):
        signing.Signature.from_bytes(data)


def test_key_id_is_stable_and_fingerprint_readable(key: Ed25519PrivateKey) -> None:
    raw = signing.public_bytes(key)
    assert signing.key_id(raw) == signing.key_id(raw)
    assert signing.is_key_id(signing.key_id(raw))
    words = signing.fingerprint_words(raw).split("-")
    assert len(words) == 8 and all(w.isalpha() for w in words)


def test_key_id_rejects_wrong_length() -> None:
    with pytest.raises(SignatureError):
        signing.key_id(b"short")
