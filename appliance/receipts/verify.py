"""``appliance receipt verify``: is this receipt a site member's, for a model this host trusts?

Checks, in order, each raising the class a caller acts on:

1. the receipt parses (``FormatError``, ``LimitExceededError``) and its signature verifies
   under the certificate it carries (``SignatureError``: any field changed);
2. that certificate was issued by this host's site CA, names the host the body names, and was
   valid at the receipt's time (``TrustError``: a host outside the site);
3. the model: the signed manifest the receipt names is in this store, its signatures meet
   the publisher threshold of this store's trust root now (``ThresholdError``), and it lists
   the model, version and file with the receipt's Merkle root (``IntegrityError``). A store
   that holds the same name and version with another root refuses the receipt
   (``IntegrityError``: a different model under the same name); a store that holds neither
   cannot say (``ModelNotFoundError``, exit 3: pull the bundle first);
4. with ``request``/``response``: their digests (``IntegrityError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from appliance import fsutil
from appliance.errors import (
    FormatError,
    IntegrityError,
    ModelNotFoundError,
    SignatureError,
    UsageError,
)
from appliance.format import fields
from appliance.format.manifest import parse_manifest
from appliance.format.publisher import check_publisher_scope, verify_manifest_signatures
from appliance.format.receipt import (
    ModelFacts,
    SignedReceipt,
    canonical,
    parse_header_value,
    parse_receipt,
    verify_receipt,
)
from appliance.format.signing import Signature
from appliance.receipts import digests
from appliance.serve.receipts import HEADER

_MAX_PEM_BYTES = 64 * 1024


@dataclass(frozen=True)
class Verification:
    """What was checked, for the report."""

    receipt: SignedReceipt
    signers: frozenset[str]  # publisher key ids that signed the model's manifest
    request_checked: bool
    response_checked: bool

    def to_json(self) -> dict[str, Any]:
        body = self.receipt.body
        return {
            "ok": True,
            "host": body.host,
            "time": fields.format_timestamp(body.time),
            "model": {"name": body.model.name, "version": body.model.version,
                      "merkle_root": body.model.merkle_root, "manifest": body.model.manifest},
            "signers": sorted(self.signers),
            "request": "matches" if self.request_checked else "not given",
            "response": "matches" if self.response_checked else "not given",
            "receipt": self.receipt.to_json()["body"],
        }


def read_receipt(path: Path) -> SignedReceipt:
    """A receipt from a file: its JSON document, the header's base64url value (alone, as an
    ``X-Appliance-Receipt:`` line, or among headers as ``curl -D`` saves them), or a saved
    response or stream that carries one."""
    data = fsutil.read_capped(path, digests.MAX_RESPONSE_BYTES, "receipt file",
                              error=UsageError, special=UsageError, too_big=UsageError)
    return load_receipt(data)


def load_receipt(data: bytes) -> SignedReceipt:
    text = data.strip()
    if not text.startswith(b"{") and not text.startswith(b"data:"):
        value = text.decode("ascii", "replace")
        for line in value.splitlines():  # the header alone, or headers as curl -D saves them
            if line.lower().startswith(HEADER + ":"):
                value = line[len(HEADER) + 1:]
                break
        return parse_header_value(value.strip())
    documents, _ = digests.parse_response(text)
    carried = [d["receipt"] for d in documents if isinstance(d.get("receipt"), dict)]
    if carried:  # a saved answer: the receipt it carries
        return parse_receipt(canonical(carried[-1]))
    if len(documents) == 1:
        return parse_receipt(text)
    raise FormatError("the file holds no receipt (a response saved without --receipts?)")


def load_site_ca(path: Path) -> x509.Certificate:
    data = fsutil.read_capped(path, _MAX_PEM_BYTES, "site CA certificate", error=UsageError,
                              special=UsageError, too_big=UsageError)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise UsageError(f"{path} is not a PEM certificate: {e}") from e


def verify(receipt: SignedReceipt, site_ca: x509.Certificate, store_dir: Path, now: datetime,
           *, request: bytes | None = None, response: bytes | None = None) -> Verification:
    verify_receipt(receipt, site_ca)
    signers = check_model(store_dir, receipt.body.model, now)
    if request is not None:
        check_request(receipt, request)
    if response is not None:
        check_response(receipt, response)
    return Verification(receipt, signers, request is not None, response is not None)


def check_request(receipt: SignedReceipt, request: bytes) -> None:
    got = digests.sha256(request)
    if got != receipt.body.request_sha256:
        raise IntegrityError(f"the request's SHA-256 is {got}, the receipt says "
                             f"{receipt.body.request_sha256}: not the request it answered")


def check_response(receipt: SignedReceipt, response: bytes) -> None:
    body = receipt.body
    documents, stream = digests.parse_response(response)
    if stream != body.stream:
        raise IntegrityError(f"the response is {'a stream' if stream else 'one document'}, "
                             f"the receipt's was {'a stream' if body.stream else 'not'}")
    got = digests.response_sha256(documents, stream)
    if got != body.response_sha256:
        raise IntegrityError(f"the response's digest is {got}, the receipt says "
                             f"{body.response_sha256}: the answer was changed")
    if digests.answer_sha256(documents) != body.answer_sha256:
        raise IntegrityError("the response's answer digest differs from the receipt's")


def check_model(store_dir: Path, model: ModelFacts, now: datetime) -> frozenset[str]:
    """The receipt's model is in a manifest this store holds, signed under its trust root."""
    from appliance.store import trust_state
    from appliance.store.records import find_model
    from appliance.store.store import Store

    root = trust_state.require_root(store_dir)
    with Store(store_dir) as store:
        held = store.manifest(model.manifest)
    if held is None:
        try:
            local = find_model(store_dir, model.ref)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(
                f"this store holds neither the bundle {model.manifest[:16]}... nor "
                f"{model.ref}: pull or import it to verify this receipt") from e
        roots = sorted({f.merkle_root for f in local.files if f.path == model.file})
        raise IntegrityError(
            f"{model.ref} in this store (Merkle root {', '.join(roots) or 'none'}, bundle "
            f"{local.manifest_hash[:16]}...) is not the receipt's (root {model.merkle_root}, "
            f"bundle {model.manifest[:16]}...): a different model under the same name",
            file=model.file)
    body, lines = held
    try:
        signatures = [Signature.from_bytes(line.encode("ascii")) for line in lines]
    except (UnicodeEncodeError, SignatureError) as e:
        raise SignatureError(f"the stored signatures of bundle {model.manifest[:16]}... are "
                             f"unreadable: {e}") from e
    # An old answer stays attributable after its bundle expired: only the signatures count.
    signers = verify_manifest_signatures(root, body, signatures, now, allow_expired=True)
    manifest = parse_manifest(body)
    check_publisher_scope(root, signers, [model.name])
    for entry in manifest.models:
        if entry.name == model.name and entry.version == model.version:
            for f in entry.files:
                if f.path == model.file:
                    if f.merkle_root != model.merkle_root:
                        raise IntegrityError(
                            f"the signed manifest gives {model.ref}/{model.file} the Merkle "
                            f"root {f.merkle_root}, the receipt {model.merkle_root}",
                            file=model.file)
                    return signers
    raise IntegrityError(f"the signed bundle {model.manifest[:16]}... holds no "
                         f"{model.ref}/{model.file}", file=model.file)
