"""Ed25519 signatures over exact bytes, with domain separation.

Pure: bytes in, objects out. A signature covers ``domain || message`` where ``domain`` names
what is signed (a manifest, a trust root), so a signature made for one kind of document can
never be replayed as another. Keys are identified by a key id derived from the raw 32-byte
public key; a detached signature is one line of text:

    appliance-sig-v1 <key_id> <base64 signature>
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

from appliance.errors import SignatureError
from appliance.limits import DEFAULT_LIMITS, Limits

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

# cryptography is imported by the functions that sign or verify, not here: ``Signature`` and
# key ids are needed by modules every command loads (the peer protocol, the CLI's parser),
# and only some commands check a signature.

DOMAIN_MANIFEST = b"appliance/manifest/v1\x00"
DOMAIN_ROOT = b"appliance/root/v1\x00"
_KEY_ID_DOMAIN = b"appliance/key-id/v1\x00"
_SIG_MAGIC = "appliance-sig-v1"
KEY_ID_HEX_CHARS = 32
ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64

# Words for reading a fingerprint aloud: 256 short, distinct words, one per byte value.
_WORDS = (  # noqa: SIM905 - one readable paragraph of words
    "acid also arch area army atom aunt away axis baby back bake ball band bank barn base bath "
    "beam bean bear bell belt bench bike bird blue boat body bold bolt bone book boot bowl box "
    "brick bush cake calm camp cape card cart case cash cave cell chalk chef chin city clay clip "
    "coal coat code coin cold comb cook cord corn cost crab crew crop cube cup dart dawn deck "
    "deer desk dial dice dish dock doll door dove drum duck dune dust eagle earth echo edge egg "
    "elbow elk epic exit face fact farm fern film fire fish flag flute foam fog fork fox frog "
    "fuel gate gear gem gift glass globe glue goat gold golf grape grass gulf hail hand harp hat "
    "hawk heart hill hive hook horn host iron ivy jade jam jar jazz jeep jet joke judo jump kayak "
    "kettle key kilt king kite knee knot lake lamp lane lava leaf lemon lens lid lily lime lion "
    "lock loft loop lunar mango map maple marsh mask meal melon mesa milk mint moon moss moth "
    "mule nail navy nest net news node noon nose nut oak oar oasis ocean olive onion opal orbit "
    "otter oven owl palm panda park pear pen pepper piano pier pine pipe plum pond pool port "
    "pulse quail quartz quilt rain ramp raven reef rice ring river robe rock roof rope rose ruby "
    "sail salt sand scarf seal seed shell ship silk sky sled snow soap sock sofa soup spark "
    "spoon star stem stone sugar sun swan table tank taxi tent tide tiger toast token tower "
    "train tree tulip tuna twig umbrella unit urn valley van vase vest violin wagon wall wave "
    "whale wheat wind wolf yak yard zebra zero zinc zone"
).split()
_WORDS = _WORDS[:256]  # the list above has more than 256 words; one word per byte value
assert len(_WORDS) == 256 and len(set(_WORDS)) == 256


@dataclass(frozen=True)
class Signature:
    """A detached signature by one key over one document."""

    key_id: str
    signature: bytes

    def to_bytes(self) -> bytes:
        encoded = base64.b64encode(self.signature).decode("ascii")
        return f"{_SIG_MAGIC} {self.key_id} {encoded}\n".encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Signature:
        if len(data) > limits.max_signature_bytes:
            raise SignatureError(f"signature file is {len(data)} bytes, over the cap")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as e:
            raise SignatureError("signature file is not ASCII") from e
        parts = text.strip().split(" ")
        if len(parts) != 3 or parts[0] != _SIG_MAGIC:
            raise SignatureError(f"signature file does not start with {_SIG_MAGIC!r}")
        key_id, encoded = parts[1], parts[2]
        if not is_key_id(key_id):
            raise SignatureError(f"malformed key id {key_id!r} in signature")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise SignatureError(f"signature by {key_id} is not valid base64") from e
        if len(raw) != ED25519_SIGNATURE_BYTES:
            raise SignatureError(f"signature by {key_id} is {len(raw)} bytes, not 64")
        return cls(key_id=key_id, signature=raw)


def is_key_id(text: str) -> bool:
    return len(text) == KEY_ID_HEX_CHARS and all(c in "0123456789abcdef" for c in text)


def public_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes_raw()


def key_id(public_raw: bytes) -> str:
    """Key id: the first 128 bits of BLAKE3 over a domain prefix and the raw public key."""
    if len(public_raw) != ED25519_PUBLIC_BYTES:
        raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(public_raw)}")
    return blake3.blake3(_KEY_ID_DOMAIN + public_raw).hexdigest()[:KEY_ID_HEX_CHARS]


def fingerprint_words(data: bytes, words: int = 8) -> str:
    """A fingerprint a person can read aloud: BLAKE3 of ``data`` as ``words`` words."""
    digest = blake3.blake3(data).digest(length=words)
    return "-".join(_WORDS[b] for b in digest)


def sign(private_key: Ed25519PrivateKey, domain: bytes, message: bytes) -> Signature:
    raw = private_key.sign(domain + message)
    return Signature(key_id=key_id(public_bytes(private_key)), signature=raw)


def verify(public_raw: bytes, domain: bytes, message: bytes, signature: Signature) -> bool:
    """True when ``signature`` is a valid signature by ``public_raw`` over domain+message.

    Returns False (never raises) for a wrong key or bad signature, so threshold counting can
    skip invalid ones; a mismatched key id is also False.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signature.key_id != key_id(public_raw):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(
            signature.signature, domain + message
        )
    except InvalidSignature:
        return False
    return True
