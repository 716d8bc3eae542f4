"""Receipts end to end: a real server signs, another member's store verifies and replays.

Host A serves the tiny GGUF from a real store (trust root installed, signed bundle seeded)
through the real app with the llama-cpp-python worker and the receipt layer; host B is a
second store that pulled the same signed bundle; host C holds another ``tiny:1``. Keys and
certificates are a site CA and hosts enrolled by ``peer.tls``, plus an intruder from another
site. The slow tests run ``appliance serve --receipts`` as a process (llama-server engine)
with the ``openai`` client, and gemma.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from bundle_helpers import Bundle, make_bundle
from cryptography import x509
from peer_helpers import seed
from serve_helpers import copy_gguf_with, wait_health
from trust_helpers import NOW, trusted_store

from appliance.cli.main import main
from appliance.errors import EXIT_OK, EXIT_REFUSED, IntegrityError, ModelNotFoundError
from appliance.format.receipt import SignedReceipt, sign_receipt
from appliance.peer import tls
from appliance.receipts import digests
from appliance.receipts.replay import replay
from appliance.receipts.verify import load_receipt, verify
from appliance.serve.app import create_app
from appliance.serve.model import ServeSettings
from appliance.serve.receipts import HEADER, HostSigner, ReceiptOptions, store_lookup
from appliance.serve.server import ServerThread
from appliance.serve.store_resolver import serve_audit, store_resolver
from appliance.store import audit

CHAT = "/v1/chat/completions"


def store_with(path: Path, bundle: Bundle) -> Path:
    trusted_store(path)
    seed(path, bundle)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("receipt-site")
    tls.init_site(base / "ca")
    tls.enroll_host("host-a", base / "ca", base / "host-a")
    tls.init_site(base / "other-ca", name="another site")
    tls.enroll_host("intruder", base / "other-ca", base / "intruder")
    ca_path = base / "ca" / "ca.crt"
    return {"base": base, "ca_path": ca_path,
            "ca": x509.load_pem_x509_certificate(ca_path.read_bytes()),
            "a": HostSigner.from_tls_dir(base / "host-a"),
            "intruder": HostSigner.from_tls_dir(base / "intruder")}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("receipt-stores")
    bundle = make_bundle({"tiny": {"tiny.gguf": tiny_gguf.read_bytes()}})
    other = copy_gguf_with(tiny_gguf, base / "other.gguf", {"general.file_type": 0})
    impostor = make_bundle({"tiny": {"tiny.gguf": other.read_bytes()}}, channel="elsewhere")
    return {"a": store_with(base / "a", bundle), "b": store_with(base / "b", bundle),
            "c": store_with(base / "c", impostor)}


def settings(**overrides: Any) -> ServeSettings:
    values: dict[str, Any] = {"models": ("tiny",), "n_threads": 2, "n_ctx": 256,
                              "engine": "llama-cpp-python", **overrides}
    return ServeSettings(**values)


@contextlib.contextmanager
def receipt_server(store: Path, signer: HostSigner, **overrides: Any) -> Iterator[ServerThread]:
    options = ReceiptOptions(signer, store_lookup(store), audit_requests=True)
    app = create_app(settings(**overrides), store_resolver(store),
                     audit=serve_audit(store, via="test"), receipts=options)
    with ServerThread(app) as server:
        wait_health(server.url)
        yield server


@pytest.fixture(scope="module")
def host_a(site: dict[str, Any], stores: dict[str, Path]) -> Iterator[str]:
    with receipt_server(stores["a"], site["a"]) as server:
        yield server.url


def request_bytes(**body: Any) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": 8, **body}).encode()


def post(url: str, path: str, body: bytes) -> httpx.Response:
    response = httpx.post(url + path, content=body, timeout=120,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response


def test_an_answer_carries_a_receipt_another_member_verifies(
        host_a: str, site: dict[str, Any], stores: dict[str, Path]) -> None:
    sent = request_bytes(temperature=0)
    response = post(host_a, CHAT, sent)
    receipt = load_receipt(response.content)
    assert load_receipt(response.headers[HEADER].encode()) == receipt
    body = receipt.body
    assert (body.host, body.api, body.path, body.stream) == ("host-a", "openai", CHAT, False)
    assert body.model.ref == "tiny:1" and body.engine.name == "llama-cpp-python"
    assert body.engine.n_threads == 2 and body.sampling.seed_source == "server"
    result = verify(receipt, site["ca"], stores["b"], NOW, request=sent,
                    response=response.content)
    assert result.request_checked and result.response_checked and result.signers
    # The audit log on host A holds the digests and nothing of the prompt or the answer.
    records = [r for r in audit.records(stores["a"]) if r.kind == "request"]
    assert records[-1].details["request_sha256"] == body.request_sha256
    assert records[-1].details["answer_sha256"] == body.answer_sha256
    text = response.json()["choices"][0]["message"]["content"]
    logged = json.dumps([r.details for r in records])
    assert "hello" not in logged and (not text.strip() or text not in logged)
    audit.verify(stores["a"])
    # One changed character of the answer, or of the request, is caught.
    edited = response.json()
    edited["choices"][0]["message"]["content"] = text + "!"
    with pytest.raises(IntegrityError, match="answer was changed"):
        verify(receipt, site["ca"], stores["b"], NOW, response=json.dumps(edited).encode())
    with pytest.raises(IntegrityError, match="not the request"):
        verify(receipt, site["ca"], stores["b"], NOW, request=sent + b" ")


def test_streams_carry_the_receipt_in_their_last_event(
        host_a: str, site: dict[str, Any], stores: dict[str, Path]) -> None:
    sent = request_bytes(stream=True, temperature=0)
    raw = post(host_a, CHAT, sent).content
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and b'"receipt"' in events[-3]
    assert b'"receipt"' not in b"".join(events[:-3])
    receipt = load_receipt(raw)
    assert receipt.body.stream
    verify(receipt, site["ca"], stores["b"], NOW, request=sent, response=raw)
    # The same request whole has the same answer digest (greedy).
    whole = load_receipt(post(host_a, CHAT, request_bytes(temperature=0)).content)
    assert whole.body.answer_sha256 == receipt.body.answer_sha256
    assert whole.body.response_sha256 != receipt.body.response_sha256
    ollama = json.dumps({"model": "tiny", "prompt": "hello", "options": {"num_predict": 8,
                                                                         "temperature": 0}})
    lines = post(host_a, "/api/generate", ollama.encode()).content
    receipt = load_receipt(lines)
    assert receipt.body.api == "ollama" and receipt.body.stream
    assert json.loads(lines.splitlines()[-1])["done"] is True
    verify(receipt, site["ca"], stores["b"], NOW, request=ollama.encode(), response=lines)


def test_replay_on_a_second_store_matches(host_a: str, stores: dict[str, Path]) -> None:
    greedy = request_bytes(temperature=0)
    receipt = load_receipt(post(host_a, CHAT, greedy).content)
    report = replay(stores["b"], receipt, greedy)
    assert report.match and report.replayed == receipt.body.answer_sha256, report
    assert report.notes == ()
    # Sampling with a seed the server chose: the receipt records it, the replay uses it.
    sampled = request_bytes(temperature=1.5, max_tokens=12)
    receipt = load_receipt(post(host_a, CHAT, sampled).content)
    assert receipt.body.sampling.seed_source == "server"
    assert receipt.body.sampling.to_json()["temperature"] == "1.5"
    assert replay(stores["b"], receipt, sampled).match


def test_a_host_that_alters_its_answers_is_caught_by_replay(
        host_a: str, site: dict[str, Any], stores: dict[str, Path]) -> None:
    sent = request_bytes(temperature=0)
    honest = post(host_a, CHAT, sent).json()
    # A lazy host answers what it likes and signs that with its own (valid) site key.
    lazy = {**honest, "choices": [{**honest["choices"][0], "message": {
        "role": "assistant", "content": "a lazy answer"}}]}
    lazy.pop("receipt")
    real = load_receipt(json.dumps(honest).encode()).body
    body = replace(real, response_sha256=digests.response_sha256([lazy], False),
                   answer_sha256=digests.answer_sha256([lazy]))
    receipt = sign_receipt(body, site["a"].key, site["a"].cert)
    saved = json.dumps({**lazy, "receipt": receipt.to_json()}).encode()
    verify(receipt, site["ca"], stores["b"], NOW, request=sent, response=saved)  # all signed
    report = replay(stores["b"], receipt, sent)
    assert not report.match and report.text == honest["choices"][0]["message"]["content"]


def test_a_different_model_under_the_same_name_fails(
        host_a: str, site: dict[str, Any], stores: dict[str, Path]) -> None:
    sent = request_bytes(temperature=0)
    receipt = load_receipt(post(host_a, CHAT, sent).content)
    with pytest.raises(IntegrityError, match="different model under the same name"):
        verify(receipt, site["ca"], stores["c"], NOW)
    with pytest.raises(IntegrityError, match="different model under the same name"):
        replay(stores["c"], receipt, sent)
    empty = trusted_store(stores["c"].parent / "empty")
    with pytest.raises(ModelNotFoundError):
        verify(receipt, site["ca"], empty, NOW)


def test_refused_requests_get_no_receipt_and_an_over_long_body_still_reaches_the_route(
        site: dict[str, Any], stores: dict[str, Path]) -> None:
    with receipt_server(stores["a"], site["a"], max_request_bytes=600) as server:
        long = request_bytes(temperature=0, stop=["x" * 700])
        answer = httpx.post(server.url + CHAT, content=long, timeout=60)
        assert answer.status_code == 400 and "larger than 600" in answer.text
        assert HEADER not in answer.headers
        # Chunked, with no length declared: the route reads past the cap itself and refuses.
        chunked = httpx.post(server.url + CHAT, content=iter([long[:300], long[300:]]),
                             timeout=60)
        assert chunked.status_code == 400 and HEADER not in chunked.headers
        broken = httpx.post(server.url + CHAT, content=b'{"model": ', timeout=60)
        assert broken.status_code == 400 and HEADER not in broken.headers
        models = httpx.get(server.url + "/v1/models", timeout=60)
        assert models.status_code == 200 and "receipt" not in models.json()
        fits = post(server.url, CHAT, request_bytes(temperature=0))
        assert HEADER in fits.headers


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_cli_verifies_refuses_and_replays(
        host_a: str, site: dict[str, Any], stores: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    sent = request_bytes(temperature=0)
    response = post(host_a, CHAT, sent)
    request_file = _write(tmp_path / "request.json", sent)
    response_file = _write(tmp_path / "response.json", response.content)
    headers = "".join(f"{k}: {v}\r\n" for k, v in response.headers.items())  # as curl -D
    header_file = _write(tmp_path / "headers.txt", f"HTTP/1.1 200 OK\r\n{headers}\r\n".encode())
    common = ["--store", str(stores["b"]), "receipt"]
    ca = ["--ca", str(site["ca_path"])]
    assert main([*common, "verify", str(header_file), *ca, "--request", str(request_file),
                 "--response", str(response_file), "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["request"] == report["response"] == "matches"
    # Signed by a host outside the site: refused (exit 2).
    receipt = load_receipt(response.content)
    outsider = site["intruder"]
    forged = sign_receipt(receipt.body, outsider.key, outsider.cert)
    forged_file = _write(tmp_path / "forged.json", forged.to_bytes())
    assert main([*common, "verify", str(forged_file), *ca]) == EXIT_REFUSED
    assert "TrustError" in capsys.readouterr().err
    tampered = _write(tmp_path / "tampered.json",
                      response.content.replace(b'"finish_reason":"', b'"finish_reason":"x'))
    assert main([*common, "verify", str(header_file), *ca, "--response", str(tampered)]
                ) == EXIT_REFUSED
    assert "IntegrityError" in capsys.readouterr().err
    assert main([*common, "replay", str(response_file), *ca, "--request", str(request_file),
                 "--json"]) == EXIT_OK
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["match"] and replayed["expected_answer_sha256"] == (
        receipt.body.answer_sha256)


def test_serve_refuses_audit_requests_without_receipts(stores: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    assert main(["--store", str(stores["a"]), "serve", "--audit-requests"]) == 1
    assert "--receipts" in capsys.readouterr().err


def _receipt_of(raw: Any) -> SignedReceipt:
    return load_receipt(raw.http_response.content)


@pytest.mark.slow
def test_openai_client_against_appliance_serve_with_receipts(
        site: dict[str, Any], stores: dict[str, Path], tmp_path: Path) -> None:
    import openai
    from serve_helpers import appliance_serve

    from appliance.serve.engine import find_binary

    if find_binary() is None:
        pytest.skip("llama-server is not built")
    tls_dir = site["base"] / "host-a"
    with appliance_serve(stores["a"], "--model", "tiny", "--receipts", "--receipt-tls-dir",
                         str(tls_dir), "--audit-requests", "--parallel", "1") as served:
        wait_health(served.url)
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
            temperature=0)
        completion = raw.parse()
        assert "receipt" in (completion.model_extra or {})
        receipt = _receipt_of(raw)
        assert load_receipt(raw.headers[HEADER].encode()) == receipt
        sent = raw.http_response.request.content
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
            temperature=0, stream=True)
        chunks = list(stream)  # the receipt event is one more chunk the client accepts
        assert chunks[-1].choices == [] and "receipt" in (chunks[-1].model_extra or {})
    body = receipt.body
    assert body.engine.name == "llama-server" and body.engine.build.startswith("llama-server")
    verify(receipt, site["ca"], stores["b"], NOW, request=sent, response=raw.http_response.content)
    assert any(r.kind == "request" and r.details["receipt_sha256"] for r in
               audit.records(stores["a"]))
    assert replay(stores["b"], receipt, sent).match
    assert digests.api_of(body.path) == "openai"


@pytest.mark.slow
def test_gemma_greedy_replay_on_a_second_store_matches(
        site: dict[str, Any], gemma_gguf: Path, tmp_path: Path) -> None:
    bundle = make_bundle({"gemma": {"gemma.gguf": gemma_gguf.read_bytes()}}, chunk=4 << 20)
    host = store_with(tmp_path / "a", bundle)
    other = Path(shutil.copytree(host, tmp_path / "b"))  # a second store holding the bundle
    sent = json.dumps({"model": "gemma", "messages": [
        {"role": "user", "content": "Name three colours."}], "max_tokens": 24,
        "temperature": 0}).encode()
    with receipt_server(host, site["a"], models=("gemma",), n_ctx=512) as server:
        receipt = load_receipt(post(server.url, CHAT, sent).content)
    assert receipt.body.model.ref == "gemma:1"
    verify(receipt, site["ca"], other, NOW, request=sent)
    assert replay(other, receipt, sent).match
