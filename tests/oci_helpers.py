"""Helpers for the OCI tests: a real CNCF Distribution registry on loopback, skopeo, a site.

``start_registry(dir)`` runs Debian's ``docker-registry`` (CNCF Distribution 2.8) on a free
127.0.0.1 port with its own config YAML and filesystem storage under ``dir``; ``blob_file``
names a blob's ``data`` file inside that storage, so a test can corrupt what the registry
serves; ``running_registry`` is the body of a fixture of it. ``site`` builds a real signed bundle
(tiny GGUF + a weights file) with the real builder, imports it into a "publisher" store and
makes an empty "receiver" store trusting the same root. Tests skip with a clear reason when
the binaries are missing.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from bundle_helpers import NOW, build, make_sources, write_recipe
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from trust_helpers import trusted_store

from appliance.importer import import_media

REGISTRY_BIN = shutil.which("docker-registry")
SKOPEO_BIN = shutil.which("skopeo")
needs_registry = pytest.mark.skipif(
    REGISTRY_BIN is None, reason="docker-registry (Debian package docker-registry) not installed")
needs_skopeo = pytest.mark.skipif(
    SKOPEO_BIN is None, reason="skopeo (Debian package skopeo) not installed")
MODEL = "acme/tiny:q4_k_m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningRegistry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    process: subprocess.Popen[bytes]

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
                / hexdigest[:2] / hexdigest / "data")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(base: Path, *, auth_yaml: str = "",
                   tls: tuple[Path, Path, Path] | None = None) -> RunningRegistry:
    """``tls``: (certificate, key, CA file the probe verifies against)."""
    assert REGISTRY_BIN is not None
    base.mkdir(parents=True, exist_ok=True)
    storage = base / "storage"
    port = free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        "storage:\n  filesystem:\n    rootdirectory: " + str(storage) + "\n"
        "  delete:\n    enabled: true\n"
        "  cache:\n    blobdescriptor: inmemory\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n"
        + (f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else "")
        + auth_yaml
    )
    log = (base / "registry.log").open("wb")
    process = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log,
                               stderr=subprocess.STDOUT)
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            status = httpx.get(f"{'https' if tls else 'http'}://{host}/v2/", timeout=1,
                               verify=ssl.create_default_context(cafile=str(tls[2]))
                               if tls else True).status_code
            if status in (200, 401):
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log_text = (base / "registry.log").read_text()
            raise RuntimeError(f"docker-registry did not start: {log_text}")
        time.sleep(0.05)
    return RunningRegistry(host, storage, process)


def running_registry(base: Path) -> Iterator[RunningRegistry]:
    """Body of a registry fixture: skip without the binary, stop it afterwards."""
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry (Debian package docker-registry) not installed")
    running = start_registry(base)
    try:
        yield running
    finally:
        running.stop()


@dataclass(frozen=True)
class Site:
    media: Path
    publisher: Path  # a store holding the model
    receiver: Path  # an empty store trusting the same root


def make_site(base: Path, gguf: Path, *, sequence: int = 1, random_mib: int = 2,
              expires_days: int = 30) -> Site:
    make_sources(base, gguf, random_mib=random_mib)
    recipe = write_recipe(base, files=("tiny.gguf", "weights.bin"), sequence=sequence,
                          expires_days=expires_days)
    build(base, recipe=recipe, out=f"media-{sequence}")
    publisher = trusted_store(base / "publisher")
    import_media(publisher, [base / f"media-{sequence}"], now=NOW)
    receiver = trusted_store(base / "receiver")
    return Site(base / f"media-{sequence}", publisher, receiver)


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    assert SKOPEO_BIN is not None
    return subprocess.run([SKOPEO_BIN, *args], capture_output=True, text=True, timeout=60,
                          check=True)


def run_pull_child(store: str, host: str, tag: str, landed: Any) -> None:
    """Body of the pull child the kill test SIGKILLs: every chunk is synced at once
    (flush_bytes=1) and committed when the next one is recorded, so ``landed`` is set from the
    third chunk on, when two are durable; each chunk is slowed so the kill lands mid-pull."""
    from appliance.oci.pull import pull
    from appliance.oci.registry import Registry, parse_reference

    recorded = []

    def progress(done: int, total: int) -> None:
        if done:
            recorded.append(done)
            if len(recorded) >= 3:
                landed.set()
            time.sleep(0.3)

    with Registry(parse_reference(f"{host}/acme/tiny:{tag}"), plain_http=True) as registry:
        pull(Path(store), registry, tag, now=NOW, progress=progress, flush_bytes=1, workers=1)


# -- a token server Distribution trusts (the bearer flow end to end) --------------------------


@dataclass
class TokenServer:
    """``GET /token``: basic credentials in, an ES256 JWT the registry verifies out."""

    url: str
    server: ThreadingHTTPServer
    issued: list[str]  # scopes a token was issued for

    def registry_yaml(self, ca_cert: Path) -> str:
        return ("auth:\n  token:\n"
                f"    realm: {self.url}\n    service: test-registry\n"
                f"    issuer: test-issuer\n    rootcertbundle: {ca_cert}\n")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def start_token_server(ca_dir: Path, username: str, password: str) -> TokenServer:
    """Signs with the site CA's key, the CA certificate in ``x5c`` (Distribution checks the
    chain against its ``rootcertbundle``)."""
    from appliance.peer import tls

    ca_cert, ca_key = tls.load_ca(ca_dir)
    x5c = [base64.b64encode(ca_cert.public_bytes(serialization.Encoding.DER)).decode()]
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    issued: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            query = parse_qs(urlparse(self.path).query)
            access = []
            for scope in query.get("scope", []):
                kind, name, actions = scope.split(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
                issued.append(scope)
            now = int(time.time())
            header = {"typ": "JWT", "alg": "ES256", "x5c": x5c}
            claims = {"iss": "test-issuer", "sub": username, "aud": "test-registry",
                      "exp": now + 300, "nbf": now - 10, "iat": now,
                      "jti": secrets.token_hex(8), "access": access}
            signing_input = (_b64url(json.dumps(header).encode()) + "."
                             + _b64url(json.dumps(claims).encode()))
            der = ca_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            token = signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
            body = json.dumps({"token": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return TokenServer(f"http://127.0.0.1:{server.server_address[1]}/token", server, issued)
