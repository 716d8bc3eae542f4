"""What receipts cost: signing and checking one, and a served answer with and without them.

``python -m bench.bench_receipts [--requests N]`` builds a site CA and a host (``peer.tls``), a
store holding the tiny llama as a signed bundle, and serves it three ways in the same run,
alternating request by request so that all three see the same machine load: no receipts,
``--receipts``, ``--receipts --audit-requests``. It prints the median latency of a greedy
8-token chat completion for each, the size of a receipt (document and header), the time to
sign and to verify one (median of 2,000), and the time ``receipt replay`` takes for the tiny
model. Not part of ``bench.run``: it compares the server with itself, not with a native tool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx

from appliance.bundle.builder import build_bundle
from appliance.format.receipt import sign_receipt, verify_receipt
from appliance.importer import import_media
from appliance.peer import tls
from appliance.receipts.replay import replay
from appliance.receipts.verify import load_receipt
from appliance.serve.app import create_app
from appliance.serve.model import ServeSettings
from appliance.serve.receipts import HEADER, HostSigner, ReceiptOptions, store_lookup
from appliance.serve.server import ServerThread
from appliance.serve.store_resolver import serve_audit, store_resolver
from appliance.tiny_model import write_tiny_llama
from bench.signed_bundle import installed_signer

BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                   "max_tokens": 8, "temperature": 0}).encode()


@contextlib.contextmanager
def server(store: Path, options: ReceiptOptions | None) -> Iterator[str]:
    settings = ServeSettings(models=("tiny",), n_threads=2, n_ctx=256)
    app = create_app(settings, store_resolver(store), audit=serve_audit(store, via="bench"),
                     receipts=options)
    with ServerThread(app) as running:
        deadline = time.monotonic() + 120
        while httpx.get(f"{running.url}/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load")
            time.sleep(0.05)
        yield running.url


def signed_store(base: Path, store: Path) -> None:
    """A store holding the tiny llama, imported from a signed bundle like any other."""
    now = datetime.now(UTC)
    key, root = installed_signer(base, store, now)
    recipe = base / "recipe.yaml"
    recipe.write_text("channel: bench\nsequence: 1\nmodels:\n"
                      "  - {name: tiny, version: '1', files: [{path: tiny.gguf}]}\n")
    build_bundle(recipe, [key], base / "media", trust_chain=[root], now=now)
    import_media(store, [base / "media"], now=now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tls.init_site(base / "ca")
        tls.enroll_host("host-a", base / "ca", base / "host-a")
        signer = HostSigner.from_tls_dir(base / "host-a")
        write_tiny_llama(base / "tiny.gguf")
        store = base / "store"
        signed_store(base, store)
        plain = ReceiptOptions(signer, store_lookup(store))
        audited = ReceiptOptions(signer, store_lookup(store), audit_requests=True)
        times: dict[str, list[float]] = {"none": [], "receipts": [], "receipts+audit": []}
        with server(store, None) as u0, server(store, plain) as u1, \
                server(store, audited) as u2, httpx.Client(timeout=120) as http:
            urls = {"none": u0, "receipts": u1, "receipts+audit": u2}
            for url in urls.values():  # warm each once
                http.post(f"{url}/v1/chat/completions", content=BODY)
            last = None
            for _ in range(args.requests):
                for name, url in urls.items():
                    started = time.perf_counter()
                    last = http.post(f"{url}/v1/chat/completions", content=BODY)
                    times[name].append(time.perf_counter() - started)
                    last.raise_for_status()
        assert last is not None
        receipt = load_receipt(last.content)
        ca = tls.load_ca(base / "ca")[0]
        sign_s, verify_s = [], []
        for _ in range(2000):
            started = time.perf_counter()
            signed = sign_receipt(receipt.body, signer.key, signer.cert)
            signed.header_value()
            sign_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            verify_receipt(signed, ca)
            verify_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        report = replay(store, receipt, BODY)
        replay_s = time.perf_counter() - started
    print(f"served answer, median of {args.requests} (tiny llama, greedy, 8 tokens, "
          "llama-cpp-python engine, 2 threads):")
    for name, values in times.items():
        print(f"  {name:15s} {statistics.median(values) * 1000:7.2f} ms")
    print(f"receipt: {len(receipt.to_bytes())} bytes, header "
          f"{len(last.headers[HEADER])} characters")
    print(f"sign + encode: {statistics.median(sign_s) * 1e6:.0f} us; verify signature and "
          f"certificate: {statistics.median(verify_s) * 1e6:.0f} us (median of 2000)")
    print(f"replay: {'match' if report.match else 'MISMATCH'} in {replay_s:.2f} s "
          "(server start, model load, answer)")


if __name__ == "__main__":
    main()
