"""Inference receipts: what a host signs for each answer it serves (pure: bytes in, objects out).

A receipt binds one answer to one signed model and to the host that produced it. Its *body*
names the request and response digests, the model (name, version, file, Merkle root, manifest
digest, whole-file BLAKE3), the sampling parameters with the seed, the engine facts that
decide determinism (llama.cpp build, thread counts, parallel slots, context, GPU layers and
devices), the host (certificate and site CA fingerprints) and the time. The *document* is::

    {"body": {...}, "cert": "<base64 DER of the host certificate>",
     "signature": {"alg": "ecdsa-p256-sha256", "value": "<base64 DER signature>"}}

The signature is the host's site key (the ECDSA P-256 key ``appliance site enroll`` issued)
over ``DOMAIN_RECEIPT || canonical(body)``; the certificate travels with it, the site CA is
referenced by fingerprint and supplied by the verifier (its own site CA).

Canonical JSON (``canonical``): keys sorted, no whitespace, ASCII with ``\\uXXXX`` escapes,
no NaN. A receipt holds no floats at all: a sampling value such as a temperature is the
decimal string of the number (``"0.7"``), so two encoders can never disagree on it. A receipt
may be given in any JSON spelling (a client may pretty-print it): the parser reads hostile
bytes once (size cap, UTF-8, unique keys, bounded depth: ``fields.json_object``), checks every
field, and the signature is checked over the canonical bytes of what was read.

Errors: ``LimitExceededError`` (over ``MAX_RECEIPT_BYTES``), ``FormatError`` (any field),
``SignatureError`` (the signature does not verify under the carried certificate's key),
``TrustError`` (the certificate is not one the verifier's site CA issued, is not the host the
body names, or was not valid at the receipt's time).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.errors import FormatError, LimitExceededError, SignatureError, TrustError
from appliance.format import fields

FORMAT = "appliance-receipt/1"
DOMAIN_RECEIPT = b"appliance/receipt/v1\x00"
ALGORITHM = "ecdsa-p256-sha256"
MAX_RECEIPT_BYTES = 8 * 1024  # the document; its header form is 4/3 of this
# The HTTP response headers that carry a receipt (base64url) or why none could be made.
HEADER = "x-appliance-receipt"
ERROR_HEADER = "x-appliance-receipt-error"
MAX_CERT_BYTES = 4 * 1024
MAX_SIGNATURE_BYTES = 128  # a DER ECDSA P-256 signature is at most 72
APIS = ("openai", "ollama")
ENGINES = ("llama-server", "llama-cpp-python")
SEED_SOURCES = ("request", "server", "none")
# Sampling fields a receipt may carry. Numbers that may be fractional are decimal strings.
DECIMAL_SAMPLING = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                    "repeat_penalty")
INTEGER_SAMPLING = ("top_k", "max_tokens")
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
MAX_STOP = 16
_NAME_BYTES = 256
_TEXT_BYTES = 512


def canonical(value: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no whitespace, ASCII, no NaN."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except ValueError as e:  # NaN or Infinity, which json.loads reads from hostile bytes
        raise FormatError(f"not canonical JSON: {e}") from e


def decimal(value: float | int) -> str:
    """A sampling number as the decimal string a receipt holds (``0.7`` -> ``"0.7"``)."""
    return repr(float(value))


@dataclass(frozen=True)
class ModelFacts:
    """The signed model that answered: the store's record of its main file."""

    name: str
    version: str
    file: str  # path of the GGUF inside the model, as in the manifest
    merkle_root: str
    manifest: str  # hash of the signed manifest the model came in
    blake3: str  # BLAKE3 of the whole file (the store's identity for it)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class EngineFacts:
    """What decides whether a re-run gives the same tokens (docs/DESIGN.md, Receipts)."""

    name: str  # llama-server | llama-cpp-python
    build: str  # the llama.cpp build (llama-server --version, or llama-cpp-python's version)
    machine: str  # CPU architecture (x86_64, aarch64)
    n_threads: int
    n_threads_batch: int
    parallel: int  # slots generating at once (continuous batching): 1 means alone
    n_ctx: int
    gpu_layers: str  # layers offloaded: a number or "all"; "0" is CPU only
    devices: tuple[str, ...]  # GPU devices llama.cpp saw
    max_tokens_default: int  # what a chat request without max_tokens got


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters the request set (decimals as strings) and the seed used."""

    seed: int | None
    seed_source: str  # request | server (the server chose it) | none (not replayable)
    values: tuple[tuple[str, Any], ...]  # sorted (name, value): decimal strings, ints, stop

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "seed_source": self.seed_source, **dict(self.values)}


@dataclass(frozen=True)
class ReceiptBody:
    time: datetime
    host: str  # the common name of the host certificate
    host_cert: str  # SHA-256 of the host certificate (DER)
    site_ca: str  # SHA-256 of the site CA certificate
    api: str  # openai | ollama
    path: str  # the HTTP path answered
    request_sha256: str  # over the exact request body bytes
    response_sha256: str  # over the canonical response (receipts/digests.py)
    answer_sha256: str  # over the canonical answer: what a replay compares
    stream: bool
    model: ModelFacts
    sampling: Sampling
    engine: EngineFacts

    def to_json(self) -> dict[str, Any]:
        e = self.engine
        return {
            "format": FORMAT,
            "time": fields.format_timestamp(self.time),
            "host": {"name": self.host, "cert_sha256": self.host_cert,
                     "ca_sha256": self.site_ca},
            "request": {"api": self.api, "path": self.path, "sha256": self.request_sha256},
            "response": {"sha256": self.response_sha256, "answer_sha256": self.answer_sha256,
                         "stream": self.stream},
            "model": {"name": self.model.name, "version": self.model.version,
                      "file": self.model.file, "merkle_root": self.model.merkle_root,
                      "manifest": self.model.manifest, "blake3": self.model.blake3},
            "sampling": self.sampling.to_json(),
            "engine": {"name": e.name, "build": e.build, "machine": e.machine,
                       "n_threads": e.n_threads, "n_threads_batch": e.n_threads_batch,
                       "parallel": e.parallel, "n_ctx": e.n_ctx, "gpu_layers": e.gpu_layers,
                       "devices": list(e.devices),
                       "max_tokens_default": e.max_tokens_default},
        }

    def to_bytes(self) -> bytes:
        return canonical(self.to_json())


@dataclass(frozen=True)
class SignedReceipt:
    body: ReceiptBody
    cert_der: bytes
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {"body": self.body.to_json(),
                "cert": base64.b64encode(self.cert_der).decode("ascii"),
                "signature": {"alg": ALGORITHM,
                              "value": base64.b64encode(self.signature).decode("ascii")}}

    def to_bytes(self) -> bytes:
        return canonical(self.to_json())

    def header_value(self) -> str:
        """The ``X-Appliance-Receipt`` header: base64url (no padding) of the document."""
        return base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode("ascii")


# -- signing and verifying ------------------------------------------------------------------


def sign_receipt(body: ReceiptBody, key: ec.EllipticCurvePrivateKey,
                 cert: x509.Certificate) -> SignedReceipt:
    """Sign ``body`` with the host's site key; the certificate must be that key's."""
    der = cert.public_bytes(serialization.Encoding.DER)
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise TrustError("the host key is not the key of the host certificate")
    signature = key.sign(DOMAIN_RECEIPT + body.to_bytes(), ec.ECDSA(hashes.SHA256()))
    return SignedReceipt(body, der, signature)


def verify_receipt(receipt: SignedReceipt, site_ca: x509.Certificate) -> x509.Certificate:
    """The signature under the carried certificate's key (SignatureError), then that the
    certificate is the site CA's, is the host the body names and was valid at the receipt's
    time (TrustError). Returns the host certificate."""
    try:
        cert = x509.load_der_x509_certificate(receipt.cert_der)
    except ValueError as e:
        raise FormatError(f"receipt: the host certificate is not DER: {e}") from e
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise SignatureError("receipt: the host certificate's key is not ECDSA P-256")
    try:
        public.verify(receipt.signature, DOMAIN_RECEIPT + receipt.body.to_bytes(),
                      ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise SignatureError("receipt: the signature does not verify under the host "
                             "certificate it carries (a field was changed)") from e
    body = receipt.body
    ca_print = site_ca.fingerprint(hashes.SHA256()).hex()
    if body.site_ca != ca_print:
        raise TrustError(f"receipt: signed under the site CA {body.site_ca[:16]}..., this "
                         f"host's site CA is {ca_print[:16]}...: a host outside this site")
    try:
        cert.verify_directly_issued_by(site_ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise TrustError(f"receipt: the host certificate of {body.host!r} is not issued by "
                         "this site's CA: a host outside the site") from e
    if cert.fingerprint(hashes.SHA256()).hex() != body.host_cert:
        raise TrustError("receipt: the carried certificate is not the one the body names")
    if _common_name(cert) != body.host:
        raise TrustError(f"receipt: the certificate names {_common_name(cert)!r}, the body "
                         f"{body.host!r}")
    if not cert.not_valid_before_utc <= body.time < cert.not_valid_after_utc:
        raise TrustError(f"receipt: made at {fields.format_timestamp(body.time)}, outside its "
                         f"certificate's validity ({cert.not_valid_before_utc:%Y-%m-%d} to "
                         f"{cert.not_valid_after_utc:%Y-%m-%d})")
    return cert


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _common_name(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


# -- parsing hostile bytes ------------------------------------------------------------------


def parse_receipt(data: bytes) -> SignedReceipt:
    """A receipt document from hostile bytes: size cap first, then JSON, format, fields."""
    if len(data) > MAX_RECEIPT_BYTES:
        raise LimitExceededError(f"receipt is {len(data)} bytes, over the cap of "
                                 f"{MAX_RECEIPT_BYTES}")
    doc = fields.json_object(data, "receipt", max_bytes=MAX_RECEIPT_BYTES)
    _no_floats(doc)
    doc = fields.record(doc, {"body", "cert", "signature"}, "receipt")
    signature = fields.record(doc["signature"], {"alg", "value"}, "receipt.signature")
    if signature["alg"] != ALGORITHM:
        raise FormatError(f"receipt.signature.alg: {str(signature['alg'])[:40]!r} is not "
                          f"{ALGORITHM}")
    return SignedReceipt(
        body=_body(doc["body"]),
        cert_der=_base64(doc["cert"], "receipt.cert", MAX_CERT_BYTES),
        signature=_base64(signature["value"], "receipt.signature.value", MAX_SIGNATURE_BYTES),
    )


def parse_header_value(value: str) -> SignedReceipt:
    """A receipt from its ``X-Appliance-Receipt`` header form (base64url, padding optional)."""
    if len(value) > MAX_RECEIPT_BYTES * 4 // 3 + 4:
        raise LimitExceededError(f"receipt header is {len(value)} characters, over the cap")
    text = value.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise FormatError(f"receipt header is not base64url: {e}") from e
    return parse_receipt(raw)


def _no_floats(value: Any) -> None:
    stack = [value]
    while stack:  # depth is already bounded by json_object
        node = stack.pop()
        if isinstance(node, float):
            raise FormatError("receipt: holds a floating-point number; sampling values are "
                              "decimal strings")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _base64(value: object, where: str, max_bytes: int) -> bytes:
    if not isinstance(value, str) or len(value) > max_bytes * 4 // 3 + 4:
        raise FormatError(f"{where}: expected base64 of at most {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError(f"{where}: not base64: {e}") from e


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise FormatError(f"{where}: expected true or false")
    return value


def _choice(value: object, where: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise FormatError(f"{where}: expected one of {', '.join(allowed)}")
    return str(value)


def _body(raw: object) -> ReceiptBody:
    body = fields.record(raw, {"format", "time", "host", "request", "response", "model",
                               "sampling", "engine"}, "receipt.body")
    if body["format"] != FORMAT:
        raise FormatError(f"receipt.body.format: expected {FORMAT!r}, got "
                          f"{str(body['format'])[:40]!r}")
    host = fields.record(body["host"], {"name", "cert_sha256", "ca_sha256"}, "receipt.host")
    request = fields.record(body["request"], {"api", "path", "sha256"}, "receipt.request")
    response = fields.record(body["response"], {"sha256", "answer_sha256", "stream"},
                             "receipt.response")
    path = fields.text(request["path"], "receipt.request.path", _TEXT_BYTES)
    if not path.startswith("/"):
        raise FormatError("receipt.request.path: must start with '/'")
    return ReceiptBody(
        time=fields.parse_timestamp(body["time"], "receipt.time"),
        host=fields.text(host["name"], "receipt.host.name", _NAME_BYTES),
        host_cert=fields.hex64(host["cert_sha256"], "receipt.host.cert_sha256"),
        site_ca=fields.hex64(host["ca_sha256"], "receipt.host.ca_sha256"),
        api=_choice(request["api"], "receipt.request.api", APIS),
        path=path,
        request_sha256=fields.hex64(request["sha256"], "receipt.request.sha256"),
        response_sha256=fields.hex64(response["sha256"], "receipt.response.sha256"),
        answer_sha256=fields.hex64(response["answer_sha256"], "receipt.response.answer_sha256"),
        stream=_bool(response["stream"], "receipt.response.stream"),
        model=_model(body["model"]),
        sampling=_sampling(body["sampling"]),
        engine=_engine(body["engine"]),
    )


def _model(raw: object) -> ModelFacts:
    m = fields.record(raw, {"name", "version", "file", "merkle_root", "manifest", "blake3"},
                      "receipt.model")
    return ModelFacts(
        name=fields.name(m["name"], "receipt.model.name", _NAME_BYTES, slash=True),
        version=fields.name(m["version"], "receipt.model.version", _NAME_BYTES),
        file=fields.relative_path(m["file"], "receipt.model.file", _TEXT_BYTES),
        merkle_root=fields.hex64(m["merkle_root"], "receipt.model.merkle_root"),
        manifest=fields.hex64(m["manifest"], "receipt.model.manifest"),
        blake3=fields.hex64(m["blake3"], "receipt.model.blake3"),
    )


def _engine(raw: object) -> EngineFacts:
    names = {"name", "build", "machine", "n_threads", "n_threads_batch", "parallel", "n_ctx",
             "gpu_layers", "devices", "max_tokens_default"}
    e = fields.record(raw, names, "receipt.engine")
    devices = fields.items(e["devices"], "receipt.engine.devices", max_items=16)
    gpu_layers = fields.text(e["gpu_layers"], "receipt.engine.gpu_layers", 16)
    if gpu_layers != "all" and not gpu_layers.isdigit():
        raise FormatError("receipt.engine.gpu_layers: a number of layers or 'all'")
    return EngineFacts(
        name=_choice(e["name"], "receipt.engine.name", ENGINES),
        build=fields.text(e["build"], "receipt.engine.build", _TEXT_BYTES),
        machine=fields.text(e["machine"], "receipt.engine.machine", 64),
        n_threads=fields.integer(e["n_threads"], "receipt.engine.n_threads", minimum=1,
                                 maximum=4096),
        n_threads_batch=fields.integer(e["n_threads_batch"], "receipt.engine.n_threads_batch",
                                       minimum=1, maximum=4096),
        parallel=fields.integer(e["parallel"], "receipt.engine.parallel", minimum=1,
                                maximum=4096),
        n_ctx=fields.integer(e["n_ctx"], "receipt.engine.n_ctx", maximum=1 << 24),
        gpu_layers=gpu_layers,
        devices=tuple(fields.text(d, "receipt.engine.devices[]", _TEXT_BYTES) for d in devices),
        max_tokens_default=fields.integer(e["max_tokens_default"],
                                          "receipt.engine.max_tokens_default", minimum=1,
                                          maximum=1 << 24),
    )


def _sampling(raw: object) -> Sampling:
    s = fields.mapping(raw, "receipt.sampling")
    fields.keys(s, {"seed", "seed_source"},
                {*DECIMAL_SAMPLING, *INTEGER_SAMPLING, "stop"}, "receipt.sampling")
    source = _choice(s["seed_source"], "receipt.sampling.seed_source", SEED_SOURCES)
    seed = s["seed"]
    if source == "none":
        if seed is not None:
            raise FormatError("receipt.sampling.seed: must be null when seed_source is none")
    else:
        seed = fields.integer(seed, "receipt.sampling.seed", minimum=SEED_RANGE[0],
                              maximum=SEED_RANGE[1])
    values: dict[str, Any] = {}
    for name in DECIMAL_SAMPLING:
        if name in s:
            values[name] = _decimal(s[name], f"receipt.sampling.{name}")
    for name in INTEGER_SAMPLING:
        if name in s:
            values[name] = fields.integer(s[name], f"receipt.sampling.{name}")
    if "stop" in s:
        stops = fields.items(s["stop"], "receipt.sampling.stop", max_items=MAX_STOP)
        values["stop"] = [fields.text(x, "receipt.sampling.stop[]", _TEXT_BYTES, control=True)
                          for x in stops]
    return Sampling(seed, source, tuple(sorted(values.items())))


def _decimal(value: object, where: str) -> str:
    text = fields.text(value, where, 32)
    try:
        number = float(text)
    except ValueError as e:
        raise FormatError(f"{where}: {text!r} is not a decimal number") from e
    if not math.isfinite(number):
        raise FormatError(f"{where}: {text!r} is not a finite number")
    if decimal(number) != text:  # one spelling per number: "0.70" and "7e-1" are refused
        raise FormatError(f"{where}: {text!r} is not in canonical form ({decimal(number)!r})")
    return text


def sampling_from(params: Mapping[str, Any], seed: int | None, seed_source: str) -> Sampling:
    """The receipt's sampling record from parsed request parameters (OpenAI field names)."""
    values: dict[str, Any] = {}
    for name in DECIMAL_SAMPLING:
        if isinstance(params.get(name), int | float) and not isinstance(params[name], bool):
            values[name] = decimal(params[name])
    for name in INTEGER_SAMPLING:
        if type(params.get(name)) is int:
            values[name] = params[name]
    stop = params.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    # Stops the record could not hold are left out: the request digest binds them anyway.
    if isinstance(stop, list) and 0 < len(stop) <= MAX_STOP and all(
            isinstance(x, str) and x and len(x.encode("utf-8", "surrogatepass")) <= _TEXT_BYTES
            for x in stop):
        values["stop"] = list(stop)
    return Sampling(seed, seed_source, tuple(sorted(values.items())))
