"""appliance.peer.protocol: hostile peer answers are refused with the exact error class."""

from __future__ import annotations

import base64
import json

import blake3
import pytest

from appliance.chunks import check_chunk
from appliance.errors import IntegrityError, PeerProtocolError, UsageError
from appliance.format.signing import Signature
from appliance.limits import Limits
from appliance.peer import protocol

H1 = "a" * 64
H2 = "b" * 64


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def summary(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "hash": H1, "channel": "main", "sequence": 3, "complete": True,
        "models": [{"name": "tiny", "version": "1"}],
    }
    base.update(over)
    return base


def test_manifest_list_round_trip() -> None:
    items = [
        protocol.ManifestSummary(H1, "main", 3, True, (protocol.ModelName("tiny", "1"),)),
        protocol.ManifestSummary(H2, "beta", 9, False, ()),
    ]
    assert protocol.parse_manifests(protocol.manifests_response(items)) == items


@pytest.mark.parametrize(
    "value",
    [
        {"protocol": 2, "manifests": []},
        {"protocol": True, "manifests": []},
        {"manifests": []},
        {"protocol": 1, "manifests": {}},
        {"protocol": 1, "manifests": [], "extra": 1},
        {"protocol": 1, "manifests": [summary(hash="A" * 64)]},
        {"protocol": 1, "manifests": [summary(hash=H1), summary(hash=H1)]},
        {"protocol": 1, "manifests": [summary(sequence=-1)]},
        {"protocol": 1, "manifests": [summary(sequence=True)]},
        {"protocol": 1, "manifests": [summary(sequence=1 << 64)]},
        {"protocol": 1, "manifests": [summary(complete="yes")]},
        {"protocol": 1, "manifests": [summary(channel="../x")]},
        {"protocol": 1, "manifests": [summary(channel="")]},
        {"protocol": 1, "manifests": [summary(models=[{"name": "a"}])]},
        {"protocol": 1, "manifests": [summary(models=[{"name": "a\x00", "version": "1"}])]},
        {"protocol": 1, "manifests": [summary(models=[{"name": "x" * 5000, "version": "1"}])]},
        {"protocol": 1, "manifests": [{k: v for k, v in summary().items() if k != "complete"}]},
        [1, 2, 3],
    ],
)
def test_hostile_manifest_lists_are_protocol_errors(value: object) -> None:
    with pytest.raises(PeerProtocolError):
        protocol.parse_manifests(body(value))


def test_duplicate_json_keys_are_refused() -> None:
    with pytest.raises(PeerProtocolError):
        protocol.parse_info(b'{"protocol": 1, "host": "a", "host": "b"}')


def test_non_json_and_deep_nesting_are_protocol_errors() -> None:
    with pytest.raises(PeerProtocolError):
        protocol.parse_info(b"\xff\xfe not json")
    with pytest.raises(PeerProtocolError):
        protocol.parse_info(b"[" * 200_000 + b"]" * 200_000)


def test_json_over_the_cap_is_refused_before_parsing() -> None:
    limits = Limits(max_peer_json_bytes=100)
    with pytest.raises(PeerProtocolError, match="over the cap"):
        protocol.parse_info(body({"protocol": 1, "host": "h" * 200}), limits)


def test_too_many_models_in_a_summary() -> None:
    limits = Limits(max_models=2)
    models = [{"name": f"m{i}", "version": "1"} for i in range(3)]
    with pytest.raises(PeerProtocolError):
        protocol.parse_manifests(body({"protocol": 1, "manifests": [summary(models=models)]}),
                                 limits)


def test_info_round_trip_and_bad_host() -> None:
    assert protocol.parse_info(protocol.info_response("host-1.lan")).host == "host-1.lan"
    with pytest.raises(PeerProtocolError):
        protocol.parse_info(body({"protocol": 1, "host": "bad host"}))


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 64, 1001])
def test_bitmap_round_trip(count: int) -> None:
    flags = [(i * 7) % 3 == 0 for i in range(count)]
    data = protocol.encode_bitmap(flags)
    assert len(data) == (count + 7) // 8
    assert protocol.decode_bitmap(data, count) == flags
    assert protocol.parse_have(protocol.have_response(H1, flags), H1, count) == flags


def test_bitmap_is_msb_first() -> None:
    assert protocol.encode_bitmap([True, False, False, False, False, False, False, True, True]) \
        == bytes([0x81, 0x80])


def have(manifest: str = H1, chunks: int = 9, bitmap: bytes = b"\x00\x00") -> bytes:
    return body({"protocol": 1, "manifest": manifest, "chunks": chunks,
                 "bitmap": base64.b64encode(bitmap).decode()})


@pytest.mark.parametrize(
    "answer",
    [
        have(manifest=H2),  # a have-map for another manifest
        have(chunks=10),  # lies about the chunk count
        have(bitmap=b"\x00"),  # too short
        have(bitmap=b"\x00\x00\x00"),  # too long
        have(bitmap=b"\x00\x01"),  # padding bit set past the last chunk
        body({"protocol": 1, "manifest": H1, "chunks": 9, "bitmap": "!!notbase64"}),
        body({"protocol": 1, "manifest": H1, "chunks": 9, "bitmap": 5}),
        body({"protocol": 1, "manifest": H1, "chunks": "9", "bitmap": "AAA="}),
    ],
)
def test_hostile_have_maps(answer: bytes) -> None:
    with pytest.raises(PeerProtocolError):
        protocol.parse_have(answer, H1, 9)


def test_trust_versions() -> None:
    assert protocol.parse_trust(protocol.trust_response([1, 2, 5])) == [1, 2, 5]
    for bad in ([2, 1], [1, 1], [0], ["1"], [True]):
        with pytest.raises(PeerProtocolError):
            protocol.parse_trust(body({"protocol": 1, "versions": bad}))
    with pytest.raises(PeerProtocolError):
        protocol.parse_trust(protocol.trust_response(list(range(1, 10))),
                             Limits(max_trust_chain_length=4))


def test_manifest_body_must_hash_to_the_hash_asked_for() -> None:
    data = b"format_version: 1\n"
    digest = blake3.blake3(data).hexdigest()
    assert protocol.check_manifest_body(data, digest) == data
    with pytest.raises(PeerProtocolError):
        protocol.check_manifest_body(data + b" ", digest)
    with pytest.raises(PeerProtocolError, match="over the cap"):
        protocol.check_manifest_body(data, digest, Limits(max_manifest_bytes=4))


def test_signatures_round_trip_and_hostile_lines() -> None:
    sig = Signature("0" * 32, bytes(64))
    other = Signature("1" * 32, bytes(range(64)))
    encoded = protocol.encode_signatures([sig, other, sig])
    assert protocol.parse_signatures(encoded) == (sig, other)
    with pytest.raises(PeerProtocolError):
        protocol.parse_signatures(b"appliance-sig-v1 nothex AAAA\n")
    with pytest.raises(PeerProtocolError):
        protocol.parse_signatures(encoded * 3, Limits(max_signatures=2))
    with pytest.raises(PeerProtocolError, match="over the cap"):
        protocol.parse_signatures(b"x" * 10_000, Limits(max_signatures=1,
                                                          max_signature_bytes=100))


def test_chunk_check_names_the_chunk() -> None:
    data = b"chunk bytes"
    digest = blake3.blake3(data).hexdigest()
    check_chunk(data, digest, len(data))
    with pytest.raises(IntegrityError) as info:
        check_chunk(b"chunk bytez", digest, len(data), peer="http://p:1")
    assert info.value.chunk == digest and "http://p:1" in str(info.value)
    with pytest.raises(IntegrityError):
        check_chunk(data[:-1], digest, len(data))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://10.0.0.5:9000", "https://10.0.0.5:9000"),
        ("10.0.0.5:9000", "https://10.0.0.5:9000"),
        ("http://host.lan", f"http://host.lan:{protocol.DEFAULT_PORT}"),
        ("https://[::1]:8765/", "https://[::1]:8765"),
    ],
)
def test_peer_urls_are_normalised(text: str, expected: str) -> None:
    assert protocol.normalize_peer_url(text) == expected


@pytest.mark.parametrize(
    "text",
    ["ftp://h:1", "https://user:pw@h:1", "https://h:1/path", "https://h:1?q=1", "https://h:99999",
     "https://:80"],
)
def test_bad_peer_urls(text: str) -> None:
    with pytest.raises(UsageError):
        protocol.normalize_peer_url(text)


def test_paths_refuse_non_digests() -> None:
    assert protocol.chunk_path(H1) == f"/v1/chunks/{H1}"
    with pytest.raises(UsageError):
        protocol.chunk_path("../../etc/passwd")
