"""The receipt format (``format/receipt.py``) and its digests (``receipts/digests.py``), pure.

Real keys and certificates: a site CA and hosts enrolled by ``peer.tls`` into ``tmp_path``; a
second site's CA for the host outside the site. Every field of a signed body is changed in
turn and must fail the signature; hostile documents fail with their exact class.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509

from appliance.errors import (
    FormatError,
    LimitExceededError,
    SignatureError,
    TrustError,
    UnsafePathError,
)
from appliance.format.receipt import (
    MAX_RECEIPT_BYTES,
    EngineFacts,
    ModelFacts,
    ReceiptBody,
    SignedReceipt,
    canonical,
    parse_header_value,
    parse_receipt,
    sampling_from,
    sign_receipt,
    verify_receipt,
)
from appliance.peer import tls
from appliance.receipts import digests
from appliance.serve.receipts import HostSigner

HEX = "ab" * 32


def sample_body(signer: HostSigner | None = None) -> ReceiptBody:
    host = signer.hostname if signer else "host-a"
    return ReceiptBody(
        time=datetime.now(UTC).replace(microsecond=0), host=host,
        host_cert=signer.cert_fingerprint if signer else HEX,
        site_ca=signer.ca_fingerprint if signer else HEX,
        api="openai", path="/v1/chat/completions", request_sha256="01" * 32,
        response_sha256="02" * 32, answer_sha256="03" * 32, stream=False,
        model=ModelFacts("tiny", "1", "tiny.gguf", "04" * 32, "05" * 32, "06" * 32),
        sampling=sampling_from({"temperature": 0.7, "top_k": 40, "max_tokens": 16,
                                "stop": ["\n"]}, 1234, "server"),
        engine=EngineFacts("llama-server", "llama-server 0.5.0-dev (build 1, commit 0c1e570)",
                           "x86_64", 2, 2, 4, 256, "0", (), 256),
    )


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k in sorted(value) for p in leaf_paths(value[k], (*prefix, k))]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in leaf_paths(v, (*prefix, i))]
    return [prefix]


BODY_FIELDS = [p for p in leaf_paths(sample_body().to_json()) if p != ("format",)]


def changed(value: Any, path: tuple[Any, ...]) -> Any:
    """``value`` changed so that it still parses (a forger's edit, not garbage)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, list):
        return ["GPU0"]
    if value is None:
        return 7
    if path[-1] == "time":
        return value[:-3] + ("58Z" if not value.endswith("58Z") else "57Z")
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    swaps = {"openai": "ollama", "llama-server": "llama-cpp-python", "server": "request",
             "0": "1", "0.7": "0.8"}
    return swaps.get(value, value + "x")


def set_path(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def get_path(doc: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = doc
    for key in path:
        node = node[key]
    return node


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("site")
    tls.init_site(base / "ca")
    tls.enroll_host("host-a", base / "ca", base / "host-a")
    tls.enroll_host("host-b", base / "ca", base / "host-b")
    tls.init_site(base / "other-ca", name="another site")
    tls.enroll_host("intruder", base / "other-ca", base / "intruder")
    ca = x509.load_pem_x509_certificate((base / "ca" / "ca.crt").read_bytes())
    return {"ca": ca, "a": HostSigner.from_tls_dir(base / "host-a"),
            "b": HostSigner.from_tls_dir(base / "host-b"),
            "intruder": HostSigner.from_tls_dir(base / "intruder")}


def signed_by(signer: HostSigner, body: ReceiptBody | None = None) -> SignedReceipt:
    return sign_receipt(body or sample_body(signer), signer.key, signer.cert)


def test_a_signed_receipt_verifies_and_survives_every_encoding(site: dict[str, Any]) -> None:
    receipt = signed_by(site["a"])
    cert = verify_receipt(receipt, site["ca"])
    assert cert == site["a"].cert
    data = receipt.to_bytes()
    assert data == canonical(json.loads(data)) and len(data) < MAX_RECEIPT_BYTES
    assert parse_receipt(data) == receipt
    pretty = json.dumps(json.loads(data), indent=4).encode()  # what a client may save
    assert parse_receipt(pretty) == receipt
    header = receipt.header_value()
    assert "=" not in header and parse_header_value(header) == receipt
    verify_receipt(parse_header_value(header), site["ca"])
    assert receipt.body.sampling.to_json() == {
        "seed": 1234, "seed_source": "server", "temperature": "0.7", "top_k": 40,
        "max_tokens": 16, "stop": ["\n"]}


@pytest.mark.parametrize("path", BODY_FIELDS, ids=lambda p: ".".join(map(str, p)))
def test_changing_any_field_fails_the_signature(site: dict[str, Any],
                                                path: tuple[Any, ...]) -> None:
    doc = signed_by(site["a"]).to_json()
    forged = copy.deepcopy(doc)
    set_path(forged["body"], path, changed(get_path(doc["body"], path), path))
    receipt = parse_receipt(canonical(forged))  # still a well-formed receipt
    assert receipt.body != parse_receipt(canonical(doc)).body
    with pytest.raises(SignatureError):
        verify_receipt(receipt, site["ca"])


def test_a_host_outside_the_site_is_refused(site: dict[str, Any]) -> None:
    outsider = site["intruder"]
    with pytest.raises(TrustError, match="outside this site"):
        verify_receipt(signed_by(outsider), site["ca"])
    # Claiming this site's CA fingerprint does not help: the certificate is not its.
    claimed = sample_body(outsider)
    claimed = replace(claimed, site_ca=site["a"].ca_fingerprint)
    with pytest.raises(TrustError, match="not issued by this site's CA"):
        verify_receipt(signed_by(outsider, claimed), site["ca"])


def test_another_members_certificate_does_not_carry_a_signature(site: dict[str, Any]) -> None:
    receipt = signed_by(site["a"])
    swapped = SignedReceipt(receipt.body, signed_by(site["b"]).cert_der, receipt.signature)
    with pytest.raises(SignatureError):
        verify_receipt(swapped, site["ca"])
    flipped = bytearray(receipt.signature)
    flipped[-1] ^= 1
    with pytest.raises(SignatureError):
        verify_receipt(SignedReceipt(receipt.body, receipt.cert_der, bytes(flipped)), site["ca"])
    # b signing a body that names a: the signature is b's, the body names a's certificate.
    with pytest.raises(TrustError, match="not the one the body names"):
        verify_receipt(sign_receipt(receipt.body, site["b"].key, site["b"].cert), site["ca"])


def test_signing_with_a_key_that_is_not_the_certificates_is_refused(
        site: dict[str, Any]) -> None:
    with pytest.raises(TrustError):
        sign_receipt(sample_body(site["a"]), site["b"].key, site["a"].cert)


def _doc(site: dict[str, Any]) -> dict[str, Any]:
    return signed_by(site["a"]).to_json()


@pytest.mark.parametrize(("edit", "error"), [
    (lambda d: d["body"]["engine"].__setitem__("n_threads", 2.0), FormatError),
    (lambda d: d["body"]["sampling"].__setitem__("temperature", 0.7), FormatError),
    (lambda d: d["body"]["sampling"].__setitem__("temperature", "0.70"), FormatError),
    (lambda d: d["body"]["sampling"].__setitem__("temperature", "nan"), FormatError),
    (lambda d: d["body"].__setitem__("format", "appliance-receipt/2"), FormatError),
    (lambda d: d["body"].__setitem__("extra", 1), FormatError),
    (lambda d: d["body"]["model"].pop("merkle_root"), FormatError),
    (lambda d: d["body"]["model"].__setitem__("name", "../etc"), UnsafePathError),
    (lambda d: d["body"]["model"].__setitem__("file", "/etc/passwd"), UnsafePathError),
    (lambda d: d["body"]["host"].__setitem__("name", "a\nb"), FormatError),
    (lambda d: d["body"]["engine"].__setitem__("gpu_layers", "many"), FormatError),
    (lambda d: d["body"]["engine"].__setitem__("n_threads", True), FormatError),
    (lambda d: d["body"]["sampling"].__setitem__("seed_source", "none"), FormatError),
    (lambda d: d["signature"].__setitem__("alg", "ed25519"), FormatError),
    (lambda d: d["signature"].__setitem__("value", "not base64!"), FormatError),
    (lambda d: d.__setitem__("cert", base64.b64encode(b"x" * 5000).decode()), FormatError),
    (lambda d: d["body"]["engine"].__setitem__("build", "x" * (MAX_RECEIPT_BYTES + 1)),
     LimitExceededError),
])
def test_hostile_documents_fail_with_their_class(site: dict[str, Any], edit: Any,
                                                 error: type[Exception]) -> None:
    doc = _doc(site)
    edit(doc)
    data = json.dumps(doc).encode()
    with pytest.raises(error) as caught:
        parse_receipt(data)
    assert type(caught.value) is error


def test_hostile_bytes_fail_before_any_field(site: dict[str, Any]) -> None:
    data = signed_by(site["a"]).to_bytes()
    with pytest.raises(FormatError, match="duplicate key"):
        parse_receipt(data[:-1] + b',"cert":"AA=="}')
    with pytest.raises(FormatError):
        parse_receipt(b"\xff" + data)
    with pytest.raises(FormatError):
        parse_receipt(b"[" * 100 + b"]" * 100)
    with pytest.raises(LimitExceededError):
        parse_receipt(b" " * (MAX_RECEIPT_BYTES + 1))
    with pytest.raises(FormatError):
        parse_header_value("not*base64url")
    with pytest.raises(LimitExceededError):
        parse_header_value("A" * (MAX_RECEIPT_BYTES * 2))
    cert_doc = json.loads(data)
    cert_doc["cert"] = base64.b64encode(b"not a certificate").decode()
    with pytest.raises(FormatError):
        verify_receipt(parse_receipt(canonical(cert_doc)), site["ca"])


# -- digests --------------------------------------------------------------------------------


CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "héllo wörld"},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 2,
            "model": "tiny", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_the_response_digest_ignores_spelling_and_sees_every_character() -> None:
    compact = json.dumps(CHAT, separators=(",", ":"), ensure_ascii=False).encode()
    pretty = json.dumps(CHAT, indent=2, sort_keys=True).encode()
    with_receipt = json.dumps({**CHAT, "receipt": {"anything": 1}}).encode()
    want = digests.response_sha256([CHAT], False)
    for saved in (compact, pretty, with_receipt):
        documents, stream = digests.parse_response(saved)
        assert not stream and digests.response_sha256(documents, stream) == want
    edited = compact.replace("wörld".encode(), b"world")
    assert digests.response_sha256(*digests.parse_response(edited)) != want


def test_a_stream_and_a_whole_answer_have_one_answer_digest() -> None:
    events = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "héllo"}),
              _chunk({"content": " wörld"}, "length")]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    documents, stream = digests.parse_response(sse.encode())
    assert stream and documents == events
    assert digests.answer_sha256(documents) == digests.answer_sha256([CHAT])
    ollama = [{"model": "tiny", "message": {"role": "assistant", "content": "héllo"},
               "done": False},
              {"model": "tiny", "message": {"role": "assistant", "content": " wörld"},
               "done": True, "done_reason": "length", "receipt": {}}]
    lines = "".join(json.dumps(d) + "\n" for d in ollama).encode()
    documents, stream = digests.parse_response(lines)
    assert stream and digests.answer(documents) == digests.answer([CHAT])
    assert digests.response_sha256(documents, True) == digests.sha256(
        canonical([digests.without_receipt(d) for d in ollama]))
    with pytest.raises(FormatError):
        digests.parse_response(b"data: {not json}\n\n")
    with pytest.raises(FormatError):
        digests.parse_response(b"data: [DONE]\n\n")


def test_a_seed_goes_where_each_api_reads_it() -> None:
    assert digests.with_seed("openai", {"model": "m"}, 5) == {"model": "m", "seed": 5}
    assert digests.with_seed("ollama", {"options": {"top_k": 1}}, 5) == {
        "options": {"top_k": 1, "seed": 5}}
    assert digests.request_seed("ollama", {"options": {"seed": 9}}) == 9
    assert digests.request_params("ollama", {"options": {"num_predict": 4}}) == {
        "max_tokens": 4}
