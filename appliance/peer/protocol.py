"""The peer protocol: request paths, response shapes, and hostile-response parsing.

Pure: bytes in, objects out; no sockets, no files, no clock. Every function that reads a peer's
answer treats it as hostile: size cap first, then the protocol version, then each field, with
unknown keys, duplicate keys, wrong types and lying counts refused as ``PeerProtocolError``.
A chunk's bytes are checked on arrival by ``appliance.chunks.check_chunk`` (the one check).

Endpoints (HTTP GET; docs/FORMAT.md, section "Peer protocol"):

    /v1/info                         {"protocol": 1, "host": NAME}
    /v1/manifests                    {"protocol": 1, "manifests": [SUMMARY...]}
    /v1/manifests/<hash>             the signed manifest's exact bytes
    /v1/manifests/<hash>/signatures  detached signatures, one ``appliance-sig-v1`` line each
    /v1/trust                        {"protocol": 1, "versions": [1, 2, ...]}
    /v1/trust/<version>              one trust-root file of the host's installed chain
    /v1/have/<hash>                  {"protocol": 1, "manifest": HASH, "chunks": N,
                                      "bitmap": BASE64}: bit i (most significant bit first)
                                      set when the host holds unique chunk i of the manifest
    /v1/have/<hash>?fetching=1       the same plus "fetching": BASE64, the chunks this
                                      host's own pull is fetching now (an announcement: a
                                      hint for other pullers, never trusted for content)
    /v1/chunks/<digest>              the chunk's plain bytes

SUMMARY is {"hash", "channel", "sequence", "complete", "models": [{"name", "version"}...]}.
Nothing a peer says is trusted: the manifest is authenticated against the puller's own trust
root, and each chunk against the manifest's digest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import blake3

from appliance.errors import PeerProtocolError, SignatureError, UsageError
from appliance.format import fields
from appliance.format.signing import Signature
from appliance.limits import DEFAULT_LIMITS, MAX_SEQUENCE, Limits

PROTOCOL_VERSION = 1
SERVICE_TYPE = "_appliance._tcp.local."
DEFAULT_PORT = 8765
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HOST_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")
_CHANNEL = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,255}\Z")
_MAX_TEXT = 1024
_MAX_TRUST_VERSIONS = 4096
FETCHING_QUERY = "fetching"


def is_digest(text: str) -> bool:
    return bool(_HEX64.match(text))


def info_path() -> str:
    return "/v1/info"


def manifests_path() -> str:
    return "/v1/manifests"


def manifest_path(manifest_hash: str) -> str:
    return f"/v1/manifests/{_digest_arg(manifest_hash)}"


def signatures_path(manifest_hash: str) -> str:
    return f"/v1/manifests/{_digest_arg(manifest_hash)}/signatures"


def trust_path() -> str:
    return "/v1/trust"


def trust_root_path(version: int) -> str:
    return f"/v1/trust/{int(version)}"


def have_path(manifest_hash: str, *, fetching: bool = False) -> str:
    """The have-map; with ``fetching`` also the chunks the peer's pull is fetching (a server
    that predates announcements ignores the query and sends the have-map alone)."""
    return f"/v1/have/{_digest_arg(manifest_hash)}" + (f"?{FETCHING_QUERY}=1" if fetching
                                                       else "")


def chunk_path(digest: str) -> str:
    return f"/v1/chunks/{_digest_arg(digest)}"


def _digest_arg(value: str) -> str:
    if not is_digest(value):
        raise UsageError(f"{value!r} is not a 64-character lowercase hex digest")
    return value


# --- peer addresses ---------------------------------------------------------------------------


def normalize_peer_url(text: str) -> str:
    """``http(s)://host:port`` with nothing else (no path, query, user); UsageError otherwise.

    A bare ``host:port`` means https: plaintext is only ever chosen explicitly.
    """
    raw = text.strip()
    if "://" not in raw:
        raw = f"https://{raw}"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"peer address {text!r} is not a URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"peer address {text!r} must be http:// or https://")
    if not parts.hostname or parts.username or parts.password:
        raise UsageError(f"peer address {text!r} needs a host and no user name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"peer address {text!r} must not have a path or query")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORT}"


# --- JSON responses ---------------------------------------------------------------------------


def parse_json(body: bytes, what: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """A JSON object from a peer: size cap, UTF-8, no duplicate keys, protocol version 1."""
    value = fields.json_object(body, f"{what} response", max_bytes=limits.max_peer_json_bytes,
                               error=PeerProtocolError)
    version = value.get("protocol")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise PeerProtocolError(f"{what}: peer speaks protocol {version!r}, not {PROTOCOL_VERSION}")
    return value


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(
        {"protocol": PROTOCOL_VERSION, **value}, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")


def _exact_keys(value: Any, keys: set[str], what: str) -> dict[str, Any]:
    return fields.record(value, keys, what, error=PeerProtocolError)


def _text(value: Any, what: str, pattern: re.Pattern[str] | None = None) -> str:
    text = fields.text(value, what, _MAX_TEXT, error=PeerProtocolError)
    if pattern is not None and not pattern.match(text):
        raise PeerProtocolError(f"{what}: {text[:80]!r} has characters that are not allowed")
    return text


def _int(value: Any, what: str, low: int = 0, high: int = MAX_SEQUENCE) -> int:
    return fields.integer(value, what, minimum=low, maximum=high, error=PeerProtocolError)


def _hex64(value: Any, what: str) -> str:
    return fields.hex64(value, what, error=PeerProtocolError)


@dataclass(frozen=True)
class PeerInfo:
    host: str


def info_response(host: str) -> bytes:
    return encode_json({"host": host})


def parse_info(body: bytes, limits: Limits = DEFAULT_LIMITS) -> PeerInfo:
    value = _exact_keys(parse_json(body, "info", limits), {"protocol", "host"}, "info")
    return PeerInfo(_text(value["host"], "info host", _HOST_NAME))


@dataclass(frozen=True)
class ModelName:
    name: str
    version: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ManifestSummary:
    """What a peer says it holds; a hint for choosing, never trusted for content."""

    hash: str
    channel: str
    sequence: int
    complete: bool
    models: tuple[ModelName, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "channel": self.channel,
            "sequence": self.sequence,
            "complete": self.complete,
            "models": [{"name": m.name, "version": m.version} for m in self.models],
        }


def manifests_response(summaries: Iterable[ManifestSummary]) -> bytes:
    return encode_json({"manifests": [s.to_json() for s in summaries]})


def parse_manifests(body: bytes, limits: Limits = DEFAULT_LIMITS) -> list[ManifestSummary]:
    value = _exact_keys(
        parse_json(body, "manifest list", limits), {"protocol", "manifests"}, "manifest list"
    )
    raw = value["manifests"]
    if not isinstance(raw, list):
        raise PeerProtocolError("manifest list: 'manifests' is not a list")
    out: list[ManifestSummary] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"manifest list item {i}"
        entry = _exact_keys(item, {"hash", "channel", "sequence", "complete", "models"}, where)
        digest = _hex64(entry["hash"], f"{where} hash")
        if digest in seen:
            raise PeerProtocolError(f"{where}: manifest {digest} listed twice")
        seen.add(digest)
        if not isinstance(entry["complete"], bool):
            raise PeerProtocolError(f"{where}: 'complete' is not a boolean")
        models_raw = entry["models"]
        if not isinstance(models_raw, list) or len(models_raw) > limits.max_models:
            raise PeerProtocolError(f"{where}: 'models' is not a list of at most "
                                    f"{limits.max_models} models")
        models = []
        for j, m in enumerate(models_raw):
            mv = _exact_keys(m, {"name", "version"}, f"{where} model {j}")
            models.append(ModelName(_text(mv["name"], f"{where} model {j} name"),
                                    _text(mv["version"], f"{where} model {j} version")))
        out.append(
            ManifestSummary(
                digest,
                _text(entry["channel"], f"{where} channel", _CHANNEL),
                _int(entry["sequence"], f"{where} sequence"),
                entry["complete"],
                tuple(models),
            )
        )
    return out


def trust_response(versions: Sequence[int]) -> bytes:
    return encode_json({"versions": list(versions)})


def parse_trust(body: bytes, limits: Limits = DEFAULT_LIMITS) -> list[int]:
    value = _exact_keys(parse_json(body, "trust list", limits), {"protocol", "versions"},
                        "trust list")
    raw = value["versions"]
    if not isinstance(raw, list) or len(raw) > min(limits.max_trust_chain_length,
                                                   _MAX_TRUST_VERSIONS):
        raise PeerProtocolError("trust list: 'versions' is not a list within the chain cap")
    versions = [_int(v, "trust list version", 1) for v in raw]
    if versions != sorted(set(versions)):
        raise PeerProtocolError("trust list: versions are not strictly ascending")
    return versions


# --- have-maps --------------------------------------------------------------------------------


def encode_bitmap(flags: Sequence[bool]) -> bytes:
    out = bytearray((len(flags) + 7) // 8)
    for i, held in enumerate(flags):
        if held:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def decode_bitmap(data: bytes, count: int) -> list[bool]:
    """Bits MSB first; the length must be exact and the padding bits zero."""
    if len(data) != (count + 7) // 8:
        raise PeerProtocolError(
            f"have-map is {len(data)} bytes, {(count + 7) // 8} expected for {count} chunks"
        )
    if count % 8 and data[-1] & (0xFF >> (count % 8)):
        raise PeerProtocolError("have-map has bits set past its last chunk")
    return [bool(data[i >> 3] & (0x80 >> (i & 7))) for i in range(count)]


@dataclass(frozen=True)
class Availability:
    """A peer's have-map and its announcement: chunks it holds, chunks on their way to it."""

    held: list[bool]
    fetching: list[bool]


def have_response(manifest_hash: str, flags: Sequence[bool],
                  fetching: Sequence[bool] | None = None) -> bytes:
    """The have-map answer; ``fetching`` (same length) only when the puller asked for it."""
    value: dict[str, Any] = {
        "manifest": manifest_hash,
        "chunks": len(flags),
        "bitmap": base64.b64encode(encode_bitmap(flags)).decode("ascii"),
    }
    if fetching is not None:
        # Held wins: a chunk that became durable since the pull last announced is not news.
        value["fetching"] = base64.b64encode(encode_bitmap(
            [on and not held for on, held in zip(fetching, flags, strict=True)]
        )).decode("ascii")
    return encode_json(value)


def _bitmap_field(value: Any, what: str, count: int) -> list[bool]:
    if not isinstance(value, str):
        raise PeerProtocolError(f"{what} is not a string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PeerProtocolError(f"{what} is not valid base64") from e
    return decode_bitmap(data, count)


def _have(body: bytes, manifest_hash: str, count: int, limits: Limits, *,
          announced: bool) -> Availability:
    value = parse_json(body, "have-map", limits)
    keys = {"protocol", "manifest", "chunks", "bitmap"}
    # An announcement is optional (a server from before announcements sends none).
    if announced and "fetching" in value:
        keys.add("fetching")
    _exact_keys(value, keys, "have-map")
    if _hex64(value["manifest"], "have-map manifest") != manifest_hash:
        raise PeerProtocolError(
            f"have-map is for manifest {value['manifest']}, not {manifest_hash}"
        )
    if _int(value["chunks"], "have-map chunks") != count:
        raise PeerProtocolError(
            f"have-map counts {value['chunks']} chunks, the manifest has {count}"
        )
    held = _bitmap_field(value["bitmap"], "have-map bitmap", count)
    if "fetching" not in value:
        return Availability(held, [False] * count)
    fetching = _bitmap_field(value["fetching"], "have-map fetching bitmap", count)
    if any(h and f for h, f in zip(held, fetching, strict=True)):
        raise PeerProtocolError("have-map announces fetching a chunk it says it holds")
    return Availability(held, fetching)


def parse_have(
    body: bytes, manifest_hash: str, count: int, limits: Limits = DEFAULT_LIMITS
) -> list[bool]:
    """Which of the manifest's ``count`` unique chunks the peer says it holds."""
    return _have(body, manifest_hash, count, limits, announced=False).held


def parse_availability(
    body: bytes, manifest_hash: str, count: int, limits: Limits = DEFAULT_LIMITS
) -> Availability:
    """The answer to ``have_path(..., fetching=True)``: held chunks and announced ones."""
    return _have(body, manifest_hash, count, limits, announced=True)


# --- signed documents and chunks --------------------------------------------------------------


def check_manifest_body(body: bytes, manifest_hash: str, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The manifest bytes a peer sent: within the cap and hashing to the hash asked for."""
    if len(body) > limits.max_manifest_bytes:
        raise PeerProtocolError(f"manifest {manifest_hash} is over the cap")
    actual = blake3.blake3(body).hexdigest()
    if actual != manifest_hash:
        raise PeerProtocolError(
            f"peer sent manifest bytes hashing to {actual} when asked for {manifest_hash}"
        )
    return body


def encode_signatures(signatures: Iterable[Signature | str]) -> bytes:
    lines = []
    for sig in signatures:
        text = sig.to_bytes().decode("ascii") if isinstance(sig, Signature) else sig
        lines.append(text.strip() + "\n")
    return "".join(lines).encode("ascii")


def signatures_cap(limits: Limits = DEFAULT_LIMITS) -> int:
    return limits.max_signatures * (limits.max_signature_bytes + 1)


def parse_signatures(body: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[Signature, ...]:
    """Detached signature lines; malformed lines are a protocol error, duplicates dropped."""
    if len(body) > signatures_cap(limits):
        raise PeerProtocolError("signature list is over the cap")
    lines = [line for line in body.split(b"\n") if line.strip()]
    if len(lines) > limits.max_signatures:
        raise PeerProtocolError(f"{len(lines)} signatures, over the cap of {limits.max_signatures}")
    out: list[Signature] = []
    for line in lines:
        try:
            sig = Signature.from_bytes(line, limits)
        except SignatureError as e:
            raise PeerProtocolError(f"signature list: {e}") from e
        if sig not in out:
            out.append(sig)
    return tuple(out)
