"""``appliance receipt replay``: run a receipt's request again here and compare the answers.

The replay serves the receipt's model from this host's store (the same name and version, and
the file must have the receipt's Merkle root and BLAKE3: a different model under the same name
is refused with ``IntegrityError``) through the same serving library, the same engine and the
engine settings the receipt records (threads, context, GPU layers, the default max_tokens),
alone (one slot, no other request batched with it), on a loopback port of its own. The request
is the one given (its SHA-256 must be the receipt's), with the seed the receipt records put in
when the server chose it. The answers match when the canonical answer digests are equal
(``receipts/digests.py``: text, finish reason and tool calls; ids and times excluded).

What keeps two runs apart (docs/DESIGN.md, "What breaks determinism") is reported as notes:
another thread count or GPU offload than the receipt's, another llama.cpp build, or an answer
generated beside others in llama-server's parallel slots.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import IntegrityError, ServeError, UsageError
from appliance.format import fields
from appliance.format.receipt import SignedReceipt
from appliance.receipts import digests
from appliance.receipts.verify import check_request

READY_TIMEOUT = 300.0  # loading gemma on a loaded 2-core machine
ANSWER_TIMEOUT = 600.0


@dataclass(frozen=True)
class ReplayReport:
    match: bool
    expected: str  # the receipt's answer digest
    replayed: str  # this run's
    text: str  # this run's answer text (first choice): what the operator compares by eye
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def to_json(self, receipt: SignedReceipt) -> dict[str, Any]:
        body = receipt.body
        return {"ok": self.match, "match": self.match,
                "model": {"name": body.model.name, "version": body.model.version},
                "engine": body.engine.name, "expected_answer_sha256": self.expected,
                "replayed_answer_sha256": self.replayed, "text": self.text,
                "notes": list(self.notes), "seconds": round(self.seconds, 3)}


def replay(store_dir: Path, receipt: SignedReceipt, request: bytes, *,
           n_threads: int | None = None) -> ReplayReport:
    """Re-run ``request`` as the receipt says it ran (see the module docstring)."""
    from appliance.serve.app import create_app
    from appliance.serve.engine import resolve_engine
    from appliance.serve.model import ServeSettings
    from appliance.serve.server import ServerThread
    from appliance.serve.store_resolver import store_resolver

    check_request(receipt, request)
    body = receipt.body
    engine = body.engine
    ref = body.model.ref
    resolve = store_resolver(store_dir, verify="quick")
    _same_model(store_dir, receipt)
    sent = _request_with_seed(receipt, request)
    served = _served_name(body.api, sent, ref)
    resolve_engine(engine.name)  # ServeError when the engine is not built here
    settings = ServeSettings(
        models=(served,), n_threads=n_threads or engine.n_threads, n_ctx=engine.n_ctx,
        max_tokens_default=engine.max_tokens_default, engine=engine.name, parallel=1,
        gpu_layers=engine.gpu_layers, keep_alive=None, max_loaded=0, preload=True,
        listen="replay",
    )
    notes = _notes(receipt, settings)
    started = time.perf_counter()
    app = create_app(settings, lambda name: replace(resolve(ref), name=name))
    # One client: each new httpx client loads the CA bundle again (0.1 s apiece).
    with ServerThread(app) as server, httpx.Client(timeout=ANSWER_TIMEOUT) as http:
        _wait_ready(http, server.url)
        response = http.post(f"{server.url}{body.path}", content=sent,
                             headers={"Content-Type": "application/json"})
    if response.status_code != 200:
        raise ServeError(f"the replay was answered {response.status_code}: "
                         f"{response.text[:300]}")
    documents, _ = digests.parse_response(response.content)
    replayed = digests.answer_sha256(documents)
    choices = digests.answer(documents)["choices"]
    return ReplayReport(replayed == body.answer_sha256, body.answer_sha256, replayed,
                        choices[0]["text"] if choices else "", time.perf_counter() - started,
                        notes)


def _same_model(store_dir: Path, receipt: SignedReceipt) -> None:
    from appliance.store.records import find_model

    facts = receipt.body.model
    record = find_model(store_dir, facts.ref)
    for f in record.files:
        if f.path == facts.file:
            if f.merkle_root != facts.merkle_root or f.blake3 != facts.blake3:
                raise IntegrityError(
                    f"{facts.ref}/{facts.file} here has the Merkle root {f.merkle_root}, the "
                    f"receipt's has {facts.merkle_root}: a different model under the same "
                    "name, so a replay would prove nothing", file=facts.file)
            return
    raise IntegrityError(f"{facts.ref} here has no file {facts.file}", file=facts.file)


def _request_with_seed(receipt: SignedReceipt, request: bytes) -> bytes:
    sampling = receipt.body.sampling
    if sampling.seed_source != "server" or sampling.seed is None:
        return request
    parsed = fields.json_object(request, "the request", max_bytes=len(request) + 1,
                                        error=UsageError)
    return json.dumps(digests.with_seed(receipt.body.api, parsed, sampling.seed)).encode()


def _served_name(api: str, request: bytes, ref: str) -> str:
    """The name the request asks for (so the route finds it), else the model's ref."""
    parsed = fields.json_object(request, "the request", max_bytes=len(request) + 1,
                                        error=UsageError)
    name = parsed.get("model")
    if isinstance(name, str) and name:
        return name.removesuffix(":latest") if api == "ollama" else name
    return ref


def _notes(receipt: SignedReceipt, settings: Any) -> tuple[str, ...]:
    from appliance.serve import receipts as serve_receipts

    engine = receipt.body.engine
    notes = []
    build = serve_receipts.llama_build(engine.name)
    if build != engine.build:
        notes.append(f"llama.cpp build here is {build!r}, the receipt's {engine.build!r}")
    if settings.n_threads != engine.n_threads:
        notes.append(f"{settings.n_threads} threads here, {engine.n_threads} in the receipt")
    if engine.parallel > 1:
        notes.append(f"the answer was generated with {engine.parallel} parallel slots: a "
                     "request batched beside others may differ from one run alone")
    if engine.gpu_layers != "0" or engine.devices:
        notes.append(f"the answer offloaded {engine.gpu_layers} layers to "
                     f"{', '.join(engine.devices) or 'a GPU'}: GPU kernels are not bit-for-bit "
                     "reproducible across devices")
    if platform.machine() != engine.machine:
        notes.append(f"this host is {platform.machine()}, the receipt's {engine.machine}")
    if receipt.body.sampling.seed_source == "none":
        notes.append("the request had no seed the receipt could record: only greedy "
                     "decoding (temperature 0) can match")
    return tuple(notes)


def _wait_ready(http: httpx.Client, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            health = http.get(f"{url}/health", timeout=10)
        except httpx.HTTPError:
            health = None
        if health is not None and health.status_code == 200:
            return
        if health is not None and health.json().get("status") == "unavailable":
            raise ServeError(f"the model did not load for the replay: {health.text[:300]}")
        time.sleep(0.05)
    raise ServeError(f"the model did not load within {READY_TIMEOUT:.0f} s for the replay")
