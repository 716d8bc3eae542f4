"""``appliance serve --receipts``: sign a receipt for every generated answer (an ASGI layer).

``ReceiptLayer`` sits inside the API-key check and watches the generation routes
(``/v1/chat/completions``, ``/v1/completions``, ``/api/chat``, ``/api/generate``); every other
request passes through untouched. For each one it:

1. reads the request body (capped at ``max_request_bytes``) and takes its SHA-256 over the
   exact bytes; a request that names no seed (or llama.cpp's "random", -1) gets one chosen
   here, so that seeded sampling can be replayed (``receipts/digests.py``);
2. lets the route answer, and for a 200 answer computes the response and answer digests;
3. signs a receipt (``format/receipt.py``) with the host's site key and attaches it:

   - non-streamed: the ``X-Appliance-Receipt`` header (base64url of the document) and a
     ``receipt`` field in the JSON body (clients ignore unknown fields);
   - OpenAI stream: one more event just before ``data: [DONE]``, a chunk with empty
     ``choices`` (like the usage chunk) and a ``receipt`` field; no header, since headers
     leave before the answer exists;
   - Ollama stream: a ``receipt`` field on the final ``"done": true`` line.

An answer that ends in an error gets no receipt. With ``audit_requests`` every receipt's
digests (never the prompt or the answer) go into the store's hash-chained audit log as a
``request`` record. A receipt that cannot be made (the store no longer lists the loaded file)
is logged and named in an ``X-Appliance-Receipt-Error`` header; the answer still goes out.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import logging
import platform
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import fsutil
from appliance.errors import ApplianceError, ServeError, UsageError
from appliance.format import fields
from appliance.format.receipt import (
    ERROR_HEADER,
    HEADER,
    EngineFacts,
    ModelFacts,
    ReceiptBody,
    SignedReceipt,
    sampling_from,
    sign_receipt,
)
from appliance.receipts import digests
from appliance.serve.model import ServableModel
from appliance.serve.state import ServerState

log = logging.getLogger("appliance.serve")

RANDOM_SEEDS = frozenset({-1, 0xFFFFFFFF})  # llama.cpp's LLAMA_DEFAULT_SEED: "pick one"
_MAX_PEM_BYTES = 64 * 1024

ModelLookup = Callable[[ServableModel], ModelFacts]


@dataclass(frozen=True)
class HostSigner:
    """The host's site key and certificate (a TLS directory made by ``site enroll``)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    ca_fingerprint: str
    hostname: str

    @classmethod
    def from_tls_dir(cls, tls_dir: Path) -> HostSigner:
        from appliance.peer import tls

        identity = tls.load_identity(tls_dir)  # issued by ca.crt, current, key matches
        try:
            cert = x509.load_pem_x509_certificate(_read(identity.cert_path))
            key = serialization.load_pem_private_key(_read(identity.key_path), password=None)
        except (ValueError, TypeError) as e:
            raise UsageError(f"cannot load the site key in {tls_dir}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UsageError(f"{identity.key_path} is not an ECDSA key")
        return cls(key, cert, identity.ca_fingerprint, identity.hostname)

    @property
    def cert_fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()


def _read(path: Path) -> bytes:
    return fsutil.read_capped(path, _MAX_PEM_BYTES, str(path), error=UsageError,
                              special=UsageError, too_big=UsageError)


@dataclass(frozen=True)
class ReceiptOptions:
    signer: HostSigner
    lookup: ModelLookup  # the loaded file -> its signed model's facts (store_lookup)
    audit_requests: bool = False
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


def store_lookup(store_dir: Path) -> ModelLookup:
    """The store's record of the file a worker loaded (for a split GGUF, its first shard),
    checked against the whole-file BLAKE3 the worker was given."""
    from appliance.store.records import find_model

    def lookup(model: ServableModel) -> ModelFacts:
        record = find_model(store_dir, model.name)
        for f in record.files:
            if f.location == model.path and f.blake3 is not None and (
                    model.shards or f.blake3 == model.identity):
                return ModelFacts(record.name, record.version, f.path, f.merkle_root,
                                  record.manifest_hash, f.blake3)
        raise ServeError(f"the store no longer lists the file {model.name} was loaded from")

    return lookup


@functools.lru_cache(maxsize=4)
def llama_build(engine: str) -> str:
    """The llama.cpp build that answers: ``llama-server --version``, or llama-cpp-python's."""
    if engine == "llama-server":
        from appliance.serve.engine import find_binary

        binary = find_binary()
        if binary is not None:
            try:
                out = subprocess.run([str(binary), "--version"], capture_output=True,
                                     text=True, timeout=30, check=False)
                lines = (out.stdout + out.stderr).splitlines()
                version = next((ln.strip() for ln in lines if ln.startswith("version:")), "")
                if version:
                    return f"llama-server {version.removeprefix('version:').strip()}"
            except (OSError, subprocess.TimeoutExpired):
                pass
        return "llama-server (version unknown)"
    try:
        return f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"
    except importlib.metadata.PackageNotFoundError:
        return "llama-cpp-python (version unknown)"


def engine_facts(state: ServerState) -> EngineFacts:
    s = state.settings
    gpu_layers = "0"  # the llama-cpp-python worker offloads nothing
    devices: tuple[str, ...] = ()
    if state.engine == "llama-server":
        from appliance.serve.engine import find_binary, gpu_devices, gpu_layers_arg

        binary = find_binary()
        if binary is not None:
            gpu_layers = gpu_layers_arg(s.gpu_layers, binary)
            devices = tuple(gpu_devices(binary))
    return EngineFacts(
        name=state.engine, build=llama_build(state.engine), machine=platform.machine(),
        n_threads=s.n_threads, n_threads_batch=s.n_threads,
        parallel=max(1, s.parallel) if state.engine == "llama-server" else 1,
        n_ctx=s.n_ctx, gpu_layers=gpu_layers, devices=devices,
        max_tokens_default=s.max_tokens_default,
    )


@dataclass
class _Exchange:
    """One request on a generation route, as the layer saw it."""

    api: str
    path: str
    request_sha256: str
    body: dict[str, Any] | None
    seed: int | None
    seed_source: str


class ReceiptLayer:
    def __init__(self, app: ASGIApp, state: ServerState, options: ReceiptOptions) -> None:
        self.app = app
        self.state = state
        self.options = options
        self._engine: EngineFacts | None = None
        self._models: dict[str, ModelFacts] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = digests.api_of(scope.get("path", "")) if scope["type"] == "http" else None
        if api is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw, finished, within = await _read_body(receive, self.state.settings.max_request_bytes)
        exchange = self._exchange(api, scope["path"], raw if within else None)
        sent = raw
        if exchange.seed_source == "server" and exchange.body is not None:
            assert exchange.seed is not None
            sent = json.dumps(digests.with_seed(api, exchange.body, exchange.seed)).encode()
            scope = {**scope, "headers": [
                (k, str(len(sent)).encode() if k == b"content-length" else v)
                for k, v in scope["headers"]]}
        await self.app(scope, _replay(sent, finished, receive),
                       _Answer(self, exchange, send).send)

    def _exchange(self, api: str, path: str, raw: bytes | None) -> _Exchange:
        """What the receipt will say of the request; ``raw`` None: too long, no receipt."""
        if raw is None:
            return _Exchange(api, path, "", None, None, "none")
        digest = digests.sha256(raw)
        try:
            body = fields.json_object(raw, "the request body", max_bytes=len(raw) + 1)
        except ApplianceError:  # the route answers 400 and no receipt is made
            return _Exchange(api, path, digest, None, None, "none")
        seed = digests.request_seed(api, body)
        if type(seed) is int and seed not in RANDOM_SEEDS:
            return _Exchange(api, path, digest, body, seed, "request")
        return _Exchange(api, path, digest, body, secrets.randbelow(1 << 31), "server")

    async def receipt(self, exchange: _Exchange, documents: list[dict[str, Any]],
                      stream: bool) -> SignedReceipt:
        """Sign the receipt for an answer made of ``documents``."""
        model = self._served(exchange, documents)
        facts = self._models.get(model.identity)
        if facts is None:
            facts = await asyncio.to_thread(self.options.lookup, model)
            self._models[model.identity] = facts
        if self._engine is None:
            self._engine = await asyncio.to_thread(engine_facts, self.state)
        params = digests.request_params(exchange.api, exchange.body or {})
        body = ReceiptBody(
            time=self.options.clock().replace(microsecond=0), host=self.options.signer.hostname,
            host_cert=self.options.signer.cert_fingerprint,
            site_ca=self.options.signer.ca_fingerprint, api=exchange.api, path=exchange.path,
            request_sha256=exchange.request_sha256,
            response_sha256=digests.response_sha256(documents, stream),
            answer_sha256=digests.answer_sha256(documents), stream=stream, model=facts,
            sampling=sampling_from(params, exchange.seed, exchange.seed_source),
            engine=self._engine,
        )
        signed = sign_receipt(body, self.options.signer.key, self.options.signer.cert)
        if self.options.audit_requests and self.state.audit is not None:
            await asyncio.to_thread(self.state.audit, "request", audit_details(signed))
        return signed

    def _served(self, exchange: _Exchange, documents: list[dict[str, Any]]) -> ServableModel:
        names = [d.get("model") for d in documents[-1:]] + [(exchange.body or {}).get("model")]
        for name in names:
            if isinstance(name, str):
                worker = self.state.workers.get(name) or self.state.workers.get(
                    name.removesuffix(":latest"))
                if worker is not None and worker.model is not None:
                    return worker.model
        loaded = [w.model for w in self.state.workers.values() if w.model is not None]
        if len(self.state.workers) == 1 and loaded:
            return loaded[0]
        raise ServeError("cannot tell which model answered")


def audit_details(receipt: SignedReceipt) -> dict[str, Any]:
    """What ``--audit-requests`` records: digests and names, never a prompt or an answer."""
    body = receipt.body
    return {"receipt_sha256": digests.sha256(receipt.to_bytes()), "path": body.path,
            "request_sha256": body.request_sha256, "response_sha256": body.response_sha256,
            "answer_sha256": body.answer_sha256, "stream": body.stream,
            "model": {"name": body.model.name, "version": body.model.version},
            "merkle_root": body.model.merkle_root, "seed": body.sampling.seed,
            "host": body.host}


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool, bool]:
    """(the request body, whether it has all been received, whether it stayed within
    ``limit``). Reading stops past the limit: the route refuses the body and reads the rest
    itself."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True, False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        finished = not message.get("more_body", False)
        if size > limit or finished:
            return b"".join(chunks), finished, size <= limit


def _replay(body: bytes, finished: bool, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` first, then whatever the client sends next (the rest
    of an over-long body, or the disconnect the routes watch for)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": not finished}
        return await receive()

    return replayed


class _Answer:
    """The ``send`` the route answers through: attaches the receipt (module docstring)."""

    def __init__(self, layer: ReceiptLayer, exchange: _Exchange, send: Send) -> None:
        self.layer = layer
        self.exchange = exchange
        self.downstream = send
        self.mode = "pass"  # pass | json | sse | ndjson
        self.start: Message | None = None
        self.buffer = b""
        self.documents: list[dict[str, Any]] = []
        self.failed = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            kind = _header(message, b"content-type")
            if message["status"] == 200 and self.exchange.body is not None:
                self.mode = ("json" if kind.startswith("application/json") else
                             "sse" if kind.startswith("text/event-stream") else
                             "ndjson" if kind.startswith("application/x-ndjson") else "pass")
            if self.mode == "json":
                self.start = message  # held: the header needs the whole answer
                return
        elif message["type"] == "http.response.body" and self.mode != "pass":
            await self._body(message)
            return
        await self.downstream(message)

    async def _body(self, message: Message) -> None:
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if not more:
                await self._whole()
            return
        separator = b"\n\n" if self.mode == "sse" else b"\n"
        *complete, self.buffer = self.buffer.split(separator)
        out = b"".join([await self._event(item + separator) for item in complete])
        if not more and self.buffer:
            out += await self._event(self.buffer)
            self.buffer = b""
        await self.downstream({"type": "http.response.body", "body": out, "more_body": more})

    async def _whole(self) -> None:
        assert self.start is not None
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        body = self.buffer
        try:
            document = json.loads(body)
            signed = await self.layer.receipt(self.exchange, [document], False)
            body = json.dumps({**document, "receipt": signed.to_json()},
                              separators=(",", ":")).encode()
            headers.append((HEADER.encode(), signed.header_value().encode()))
        except (ApplianceError, ValueError) as e:
            headers.append((ERROR_HEADER.encode(), _problem(e)))
        headers.append((b"content-length", str(len(body)).encode()))
        await self.downstream({**self.start, "headers": headers})
        await self.downstream({"type": "http.response.body", "body": body, "more_body": False})

    async def _event(self, raw: bytes) -> bytes:
        """One SSE event or NDJSON line, forwarded with the receipt where it goes."""
        if self.failed or not raw.strip():
            return raw
        payload = raw.strip()
        if self.mode == "sse":
            payload = payload.removeprefix(b"data:").strip()
            if payload == b"[DONE]":
                return await self._sse_receipt() + raw
        try:
            document = json.loads(payload)
        except ValueError:
            self.failed = True
            return raw
        if not isinstance(document, dict) or "error" in document:
            self.failed = True  # an answer that ends in an error is not an answer
            return raw
        self.documents.append(document)
        if self.mode == "ndjson" and document.get("done") is True:
            try:
                signed = await self.layer.receipt(self.exchange, self.documents, True)
            except ApplianceError as e:
                log.error("no receipt for %s: %s", self.exchange.path, e)
                return raw
            return json.dumps({**document, "receipt": signed.to_json()}).encode() + b"\n"
        return raw

    async def _sse_receipt(self) -> bytes:
        last = self.documents[-1] if self.documents else {}
        carrier = {"id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk"),
                   "created": last.get("created", 0), "model": last.get("model", ""),
                   "choices": []}
        try:
            signed = await self.layer.receipt(self.exchange, [*self.documents, carrier], True)
        except ApplianceError as e:
            log.error("no receipt for %s: %s", self.exchange.path, e)
            return b""
        event = json.dumps({**carrier, "receipt": signed.to_json()}, separators=(",", ":"))
        return f"data: {event}\n\n".encode()


def _header(message: Message, name: bytes) -> str:
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1").lower()
    return ""


def _problem(error: Exception) -> bytes:
    log.error("no receipt: %s: %s", type(error).__name__, error)
    text = f"{type(error).__name__}: {error}"[:300]
    return text.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
