"""Finding peers: mDNS (zeroconf, ``_appliance._tcp.local.``) and the site config's static list.

mDNS is unauthenticated: anything on the LAN can answer, so a discovered record is only an
address to try (the TLS handshake decides membership, the signed manifest decides content).
Records are still parsed defensively: the scheme must be http or https, the port a port, the
address a unicast IP. Where multicast is blocked (the failure Syncthing users know), the
static list in the site config keeps the site working.

Site config (``<store>/site.yaml`` unless ``--site-config`` says otherwise), all keys optional::

    peers:                      # static peer list, tried besides mDNS
      - https://10.0.0.5:8765
      - host-b.lan:8765         # https is implied
    tls_dir: /etc/appliance/tls # this host's site certificate (appliance site enroll)

The library never prints; the CLI shows what ``browse`` and ``load_site_config`` return.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import ifaddr

from appliance.errors import ApplianceError, FormatError, PeerError, UsageError
from appliance.format import yamlsafe
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.peer.protocol import PROTOCOL_VERSION, SERVICE_TYPE, normalize_peer_url

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, ServiceListener, Zeroconf

# zeroconf (and the asyncio it runs on) is imported where mDNS runs, not here: a pull from
# --from peers with --no-mdns reads the site config through this module and never multicasts.

SITE_CONFIG_NAME = "site.yaml"
MAX_SITE_CONFIG_BYTES = 256 * 1024
MAX_STATIC_PEERS = 1024
MAX_DISCOVERED = 256
_INSTANCE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class Peer:
    """A peer to try: its URL, a name to show, and where we learned of it."""

    url: str
    name: str
    source: str  # "mdns", "static" or "command line"


@dataclass(frozen=True)
class SiteConfig:
    peers: tuple[str, ...] = ()
    tls_dir: Path | None = None


def default_site_config(store_dir: Path) -> Path:
    return store_dir / SITE_CONFIG_NAME


def load_site_config(path: Path, limits: Limits = DEFAULT_LIMITS) -> SiteConfig:
    """The site config at ``path``; an absent file is an empty config."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SITE_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return SiteConfig()
    except OSError as e:
        raise UsageError(f"cannot read the site config {path}: {e}") from e
    if len(data) > MAX_SITE_CONFIG_BYTES:
        raise UsageError(f"site config {path} is over {MAX_SITE_CONFIG_BYTES} bytes")
    try:
        value = yamlsafe.load(data, max_bytes=MAX_SITE_CONFIG_BYTES,
                              max_depth=limits.max_yaml_depth, what=f"site config {path}")
    except FormatError as e:
        raise UsageError(str(e)) from e
    if value is None:
        return SiteConfig()
    if not isinstance(value, dict) or set(value) - {"peers", "tls_dir"}:
        raise UsageError(f"site config {path} may only hold 'peers' and 'tls_dir'")
    raw_peers = value.get("peers") or []
    if not isinstance(raw_peers, list) or len(raw_peers) > MAX_STATIC_PEERS:
        raise UsageError(f"site config {path}: 'peers' must be a list of at most "
                         f"{MAX_STATIC_PEERS} URLs")
    peers = []
    for item in raw_peers:
        if not isinstance(item, str):
            raise UsageError(f"site config {path}: peer {item!r} is not a URL")
        peers.append(normalize_peer_url(item))
    tls_dir = value.get("tls_dir")
    if tls_dir is not None and not isinstance(tls_dir, str):
        raise UsageError(f"site config {path}: 'tls_dir' must be a path")
    tls_path = None
    if tls_dir:
        tls_path = Path(tls_dir).expanduser()
        if not tls_path.is_absolute():
            tls_path = path.parent / tls_path
    return SiteConfig(tuple(dict.fromkeys(peers)), tls_path)


def static_peers(config: SiteConfig) -> list[Peer]:
    return [Peer(url, url.split("://", 1)[1], "static") for url in config.peers]


# --- mDNS ---------------------------------------------------------------------------------


def local_addresses(include_loopback: bool = False) -> list[str]:
    """This host's unicast IPv4 addresses (IPv6 link-local would need a scope in URLs)."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue
            addr = ipaddress.ip_address(ip.ip)
            if addr.is_loopback and not include_loopback:
                continue
            if addr.is_multicast or addr.is_unspecified or addr.is_link_local:
                continue
            out.append(str(addr))
    return sorted(set(out))


def _instance_name(host_name: str, port: int) -> str:
    clean = "".join(c if c in _INSTANCE_CHARS else "-" for c in host_name)[:48] or "host"
    return f"{clean}-{port}"


def service_info(host_name: str, port: int, addresses: Sequence[str], *, scheme: str
                 ) -> ServiceInfo:
    """The record a host advertises: where it listens and whether it speaks https."""
    from zeroconf import ServiceInfo

    if scheme not in ("http", "https"):
        raise UsageError(f"scheme {scheme!r} is not http or https")
    if not addresses:
        raise PeerError("no network address to advertise; is the host on a LAN?")
    instance = _instance_name(host_name, port)
    return ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=port,
        properties={"proto": str(PROTOCOL_VERSION), "scheme": scheme, "host": host_name[:63]},
        server=f"{instance}.local.",
        parsed_addresses=list(addresses),
    )


def _text(props: dict[Any, Any], key: str) -> str | None:
    value = props.get(key.encode())
    if not isinstance(value, bytes) or len(value) > 255:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def peer_from_info(info: ServiceInfo) -> Peer | None:
    """A peer from a (hostile) mDNS record, or None when it is not a usable appliance peer."""
    from zeroconf import IPVersion

    props = info.properties or {}
    if _text(props, "proto") != str(PROTOCOL_VERSION):
        return None
    scheme = _text(props, "scheme")
    if scheme not in ("http", "https") or not info.port or not 0 < info.port < 65536:
        return None
    for text in info.parsed_addresses(IPVersion.V4Only):
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if addr.is_multicast or addr.is_unspecified:
            continue
        try:
            url = normalize_peer_url(f"{scheme}://{addr}:{info.port}")
        except UsageError:
            continue
        name = _text(props, "host") or info.name.removesuffix(f".{SERVICE_TYPE}")
        return Peer(url, name, "mdns")
    return None


def _zeroconf(interfaces: Sequence[str] | None) -> Zeroconf:
    from zeroconf import IPVersion, Zeroconf

    try:
        if interfaces:
            return Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
        return Zeroconf(ip_version=IPVersion.V4Only)
    except (OSError, ApplianceError) as e:
        raise PeerError(f"mDNS is unavailable on this host: {e}") from e


class Advertiser:
    """Announces this host's peer server by mDNS until closed."""

    def __init__(self, host_name: str, port: int, *, scheme: str,
                 addresses: Sequence[str] | None = None) -> None:
        addrs = list(addresses) if addresses is not None else local_addresses()
        self.info = service_info(host_name, port, addrs, scheme=scheme)
        self.addresses = addrs
        self.zc: Zeroconf | None = None

    def start(self) -> Advertiser:
        self.zc = _zeroconf(self.addresses)
        try:
            self.zc.register_service(self.info, allow_name_change=True)
        except Exception as e:  # zeroconf raises its own error types and OSError
            self.zc.close()
            self.zc = None
            raise PeerError(f"cannot advertise {self.info.name} by mDNS: {e}") from e
        return self

    def close(self) -> None:
        if self.zc is not None:
            try:
                self.zc.unregister_service(self.info)
            finally:
                self.zc.close()
                self.zc = None

    def __enter__(self) -> Advertiser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Collector:
    """A zeroconf ``ServiceListener`` by its three methods (``ServiceBrowser`` calls them by
    name), so that defining it needs no zeroconf import."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.lock = threading.Lock()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            if len(self.names) < MAX_DISCOVERED:
                self.names.add(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.names.discard(name)


def browse(timeout: float = 2.0, *, interfaces: Sequence[str] | None = None) -> list[Peer]:
    """Peers that answer an mDNS query for ``_appliance._tcp.local.`` within ``timeout``."""
    from zeroconf import ServiceBrowser

    zc = _zeroconf(interfaces)
    try:
        collector = _Collector()
        browser = ServiceBrowser(zc, SERVICE_TYPE, listener=cast("ServiceListener", collector))
        time.sleep(timeout)
        browser.cancel()
        with collector.lock:
            names = sorted(collector.names)
        peers: dict[str, Peer] = {}
        for name in names:
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=int(min(timeout, 2.0) * 1000))
            peer = peer_from_info(info) if info is not None else None
            if peer is not None:
                peers.setdefault(peer.url, peer)
        return list(peers.values())
    finally:
        zc.close()


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "appliance"
