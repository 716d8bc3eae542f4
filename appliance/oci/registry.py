"""An OCI distribution-spec client over httpx: references, credentials, auth, blobs, manifests.

Why httpx and not a registry library: docs/OCI.md ("Client library") says it once. Registry
access as registries expect it:

- ``parse_reference("host[:port]/repo[:tag|@sha256:...]")``: the registry host is always
  explicit (an air-gapped site has no default registry);
- credentials from ``--username``/``--password-stdin``, else a Docker-style ``config.json``
  (``--authfile``, else ``$REGISTRY_AUTH_FILE``, else ``$DOCKER_CONFIG/config.json``, else
  ``~/.docker/config.json``);
- ``RegistryAuth`` answers a 401 challenge: ``Basic`` with the credentials, or the token flow
  (``Bearer realm=...,service=...,scope=...``: a GET to the realm, basic credentials if any,
  then the token on every request of the session);
- TLS verified against the system store or ``--ca-file``; ``plain_http`` only to loopback
  (``UsageError`` otherwise: a site registry is never spoken to in clear).

``Registry`` implements ``appliance.oci.targets.Target``. Transport failures and unexpected
statuses are ``PeerError`` (a registry is a remote that only moves bytes; trust is decided by
the signed manifest, never by it).
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import ssl
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx

from appliance.errors import FormatError, IntegrityError, PeerError, UsageError
from appliance.oci import mapping
from appliance.oci.mapping import Descriptor

ACCEPT_MANIFESTS = f"{mapping.OCI_MANIFEST}, {mapping.OCI_INDEX}"
MAX_AUTHFILE_BYTES = 1024 * 1024
MAX_TOKEN_BYTES = 64 * 1024
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.registry}/{self.repository}{at}"


def parse_reference(text: str) -> Reference:
    """``host[:port]/repo/path[:tag][@sha256:hex]`` (UsageError if malformed)."""
    rest, _, digest = text.partition("@")
    if "/" not in rest:
        raise UsageError(f"{text!r}: name the registry, e.g. registry.site:5000/models/name:tag")
    host, _, path = rest.partition("/")
    if not ("." in host or ":" in host or host == "localhost"):
        raise UsageError(f"{text!r}: {host!r} is not a registry host (no default registry)")
    tag = None
    if ":" in path.rsplit("/", 1)[-1]:
        path, _, tag = path.rpartition(":")
        if not _TAG.match(tag):
            raise UsageError(f"{text!r}: {tag!r} is not a valid tag")
    if not _REPO.match(path):
        raise UsageError(f"{text!r}: {path!r} is not a valid repository name (lower case)")
    if digest:
        try:
            mapping.check_digest(digest, text)
        except FormatError as e:
            raise UsageError(str(e)) from e
    return Reference(host, path, tag, digest or None)


def is_loopback(host: str) -> bool:
    if host.startswith("["):  # [v6]:port
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def default_authfile() -> Path:
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return Path(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("DOCKER_CONFIG"):
        return Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _auth_key(key: str) -> str:
    """``https://host:port/v1/`` and ``host:port`` name the same registry."""
    key = key.removeprefix("https://").removeprefix("http://")
    return key.split("/", 1)[0]


def authfile_credentials(registry: str, authfile: Path | None = None) -> Credentials | None:
    """The entry for ``registry`` in a Docker-style ``config.json`` (``auths``).

    A file named explicitly must exist (UsageError); the default one may be absent.
    Credential helpers (``credsStore``) are not run: an air-gapped host has none configured.
    """
    path = authfile or default_authfile()
    try:
        raw = path.read_bytes()[: MAX_AUTHFILE_BYTES + 1]
    except FileNotFoundError:
        if authfile is not None:
            raise UsageError(f"auth file {path} does not exist") from None
        return None
    except OSError as e:
        raise UsageError(f"cannot read auth file {path}: {e}") from e
    try:
        doc = json.loads(raw)
        auths = doc.get("auths", {}) if isinstance(doc, dict) else {}
    except ValueError as e:
        raise UsageError(f"auth file {path} is not JSON: {e}") from e
    for key, entry in (auths.items() if isinstance(auths, dict) else ()):
        if _auth_key(key) != registry or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as e:
                raise UsageError(f"auth file {path}: bad 'auth' for {key}") from e
            return Credentials(user, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


class RegistryAuth(httpx.Auth):
    """Answers 401 challenges (Basic, or the Bearer token flow) and keeps the token."""

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        self._lock = threading.Lock()
        self._header: str | None = None  # what the last successful challenge asked for

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        with self._lock:
            header = self._header
        if header:
            request.headers["Authorization"] = header
        response = yield request
        if response.status_code != 401:
            return
        scheme, _, rest = response.headers.get("www-authenticate", "").partition(" ")
        params = dict(_PARAM.findall(rest))
        if scheme.lower() == "basic":
            if self.credentials is None:
                return
            header = self.credentials.basic()
        elif scheme.lower() == "bearer" and "realm" in params:
            query = {k: params[k] for k in ("service", "scope") if k in params}
            token_request = httpx.Request("GET", params["realm"], params=query)
            if self.credentials is not None:
                token_request.headers["Authorization"] = self.credentials.basic()
            token_response = yield token_request
            body = token_response.read()
            if token_response.status_code != 200 or len(body) > MAX_TOKEN_BYTES:
                return  # the caller sees the original 401 and says so
            try:
                doc = json.loads(body)
                token = doc.get("token") or doc.get("access_token")
            except (ValueError, AttributeError):
                return
            if not isinstance(token, str):
                return
            header = f"Bearer {token}"
        else:
            return
        with self._lock:
            self._header = header
        request.headers["Authorization"] = header
        yield request


# -- the client -------------------------------------------------------------------------------


class Registry:
    """One repository on one registry (``appliance.oci.targets.Target``)."""

    def __init__(
        self,
        ref: Reference,
        *,
        credentials: Credentials | None = None,
        plain_http: bool = False,
        ca_file: Path | None = None,
        timeout: float = 60.0,
        connections: int = 8,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if plain_http and not is_loopback(ref.registry):
            raise UsageError(f"--plain-http is only allowed for a loopback registry, not "
                             f"{ref.registry}: give the site CA with --ca-file instead")
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            if not ca_file.is_file():
                raise UsageError(f"CA file {ca_file} does not exist")
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"CA file {ca_file} is unusable: {e}") from e
        self.ref = ref
        self.name = str(ref)
        self.base = f"{'http' if plain_http else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.client = httpx.Client(
            auth=RegistryAuth(credentials), verify=verify, follow_redirects=True,
            timeout=httpx.Timeout(timeout, connect=10.0), transport=transport,
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections),
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _fail(self, what: str, response: httpx.Response) -> PeerError:
        if response.status_code in (401, 403):
            return PeerError(f"registry {self.ref.registry} refused {what} "
                             f"(HTTP {response.status_code}): give credentials with --authfile "
                             "or --username/--password-stdin")
        return PeerError(f"registry {self.ref.registry}: {what} failed "
                         f"(HTTP {response.status_code})")

    @contextlib.contextmanager
    def _stream(self, method: str, url: str, **kwargs: object) -> Iterator[httpx.Response]:
        try:
            with self.client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
                yield response
        except httpx.HTTPError as e:
            raise PeerError(f"registry {self.ref.registry}: {method} {url}: {e}") from e

    def _request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            return self.client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as e:
            raise PeerError(f"registry {self.ref.registry}: {method} {url}: {e}") from e

    def _read_capped(self, response: httpx.Response, cap: int, what: str) -> bytes:
        data = bytearray()
        try:
            for piece in response.iter_bytes():
                data += piece
                if len(data) > cap:
                    raise FormatError(f"{what} from {self.ref.registry} is over {cap} bytes")
        except httpx.HTTPError as e:
            raise PeerError(f"registry {self.ref.registry}: reading {what}: {e}") from e
        return bytes(data)

    # -- Target -----------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        response = self._request("HEAD", f"{self.base}/blobs/{digest}")
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise self._fail(f"checking blob {digest}", response)
        return True

    def put_blob(self, digest: str, size: int, body: Callable[[], Iterable[bytes]]) -> None:
        """POST an upload session (its 401 fetches a token before any byte streams), then
        one monolithic PUT streaming ``body``; the registry checks the digest."""
        start = self._request("POST", f"{self.base}/blobs/uploads/",
                              headers={"Content-Length": "0"})
        if start.status_code != 202 or "location" not in start.headers:
            raise self._fail(f"starting the upload of {digest}", start)
        location = urljoin(str(start.url), start.headers["location"])
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        done = self._request("PUT", f"{location}{sep}digest={digest}", headers=headers,
                             content=iter(body()))
        if done.status_code != 201:
            raise self._fail(f"uploading blob {digest}", done)

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> bool:
        """True when the registry processed the manifest's ``subject`` (``OCI-Subject``)."""
        response = self._request("PUT", f"{self.base}/manifests/{reference}", content=data,
                                 headers={"Content-Type": media_type})
        if response.status_code != 201:
            raise self._fail(f"putting manifest {reference}", response)
        return "oci-subject" in response.headers

    def get_manifest(self, reference: str) -> tuple[bytes, str] | None:
        with self._stream("GET", f"{self.base}/manifests/{reference}",
                          headers={"Accept": ACCEPT_MANIFESTS}) as response:
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise self._fail(f"getting manifest {reference}", response)
            data = self._read_capped(response, mapping.MAX_OCI_JSON_BYTES, "manifest")
        digest = mapping.sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"registry {self.ref.registry} served other bytes for "
                                 f"manifest {reference} (they hash to {digest})")
        return data, digest

    def get_blob(self, digest: str, cap: int) -> bytes:
        with self._stream("GET", f"{self.base}/blobs/{digest}") as response:
            if response.status_code != 200:
                raise self._fail(f"getting blob {digest}", response)
            data = self._read_capped(response, cap, f"blob {digest}")
        if mapping.sha256_digest(data) != digest:
            raise IntegrityError(f"registry {self.ref.registry} served other bytes for "
                                 f"blob {digest}")
        return data

    @contextlib.contextmanager
    def read_range(self, digest: str, start: int, end: int) -> Iterator[Iterator[bytes]]:
        """Bytes ``[start, end)`` of a blob; a server that ignores Range is skipped forward."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        with self._stream("GET", f"{self.base}/blobs/{digest}", headers=headers) as response:
            if response.status_code not in (200, 206):
                raise self._fail(f"getting blob {digest}", response)
            skip = start if response.status_code == 200 else 0
            yield _window(response.iter_raw(1 << 20), skip, end - start, self.ref.registry)

    def referrers(self, digest: str, artifact_type: str) -> list[Descriptor] | None:
        """The referrers API; None when the registry does not have it (tag schema then)."""
        with self._stream("GET", f"{self.base}/referrers/{digest}",
                          params={"artifactType": artifact_type}) as response:
            if response.status_code in (400, 404, 405):
                return None
            if response.status_code != 200:
                raise self._fail(f"listing referrers of {digest}", response)
            data = self._read_capped(response, mapping.MAX_OCI_JSON_BYTES, "referrers")
        return [d for d in mapping.parse_index(data, "referrers index")
                if d.artifact_type == artifact_type]


def _window(pieces: Iterator[bytes], skip: int, length: int, where: str) -> Iterator[bytes]:
    """``length`` bytes after ``skip`` from a body; httpx errors become ``PeerError``."""
    try:
        for piece in pieces:
            if skip:
                if len(piece) <= skip:
                    skip -= len(piece)
                    continue
                piece, skip = piece[skip:], 0
            if len(piece) >= length:
                if length:
                    yield piece[:length]
                return
            length -= len(piece)
            yield piece
    except httpx.HTTPError as e:
        raise PeerError(f"registry {where}: reading a blob: {e}") from e
