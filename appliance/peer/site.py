"""This host's place in the site: its site config, its TLS directory, and the peers it knows.

The decisions ``appliance peer`` and the TUI's Peers screen share, made once: which site
config (``--site-config``, else ``STORE/site.yaml``), which TLS directory (``--tls-dir``, else
the config's ``tls_dir``, else ``STORE/tls`` when it holds a host certificate; plaintext only
when the operator asked for it), which peers (the config's static list, URLs the operator
gave, an mDNS browse), and what each of them says it holds. What a peer says here is a hint:
a pull authenticates every manifest and chunk against this host's trust root.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, PeerError, UsageError
from appliance.peer import discovery
from appliance.peer.client import ConnectPolicy, PeerClient, Timeouts, connect_policy
from appliance.peer.protocol import ManifestSummary

Warn = Callable[[str], None]
# A listing asks each peer twice (info, manifests); a slow one must not hold the screen.
DESCRIBE_TIMEOUTS = Timeouts(connect=3, read=5)


@dataclass(frozen=True)
class PeerView:
    """A known peer and what it says it holds, or why it could not be asked."""

    url: str
    source: str  # static | mdns | command line | typed
    name: str
    host: str | None
    holds: tuple[ManifestSummary, ...]
    problem: str | None  # unreachable, refused by the connection policy: why

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.ref for s in self.holds for m in s.models))

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"url": self.url, "source": self.source, "name": self.name}
        if self.problem is not None:
            entry["error"] = self.problem
        else:
            entry["host"] = self.host
            entry["manifests"] = [s.to_json() for s in self.holds]
        return entry


@dataclass(frozen=True)
class Connection:
    """How this host talks to peers, with the TLS directory it uses (None: plaintext)."""

    policy: ConnectPolicy
    tls_dir: Path | None

    @property
    def mode(self) -> str:
        if self.tls_dir is None:
            return "PLAINTEXT (--insecure)"
        return f"mutual TLS (site CA in {self.tls_dir})"


def site_config(store_dir: Path, path: Path | None = None) -> discovery.SiteConfig:
    """The config at ``path`` (which must exist), else ``STORE/site.yaml`` (may be absent)."""
    if path is not None and not path.exists():
        raise UsageError(f"site config {path} does not exist")
    return discovery.load_site_config(path or discovery.default_site_config(store_dir))


def tls_dir(store_dir: Path, config: discovery.SiteConfig, given: Path | None,
            insecure: bool) -> Path | None:
    """The site TLS directory: ``given``, else the config's, else ``STORE/tls`` if it holds a
    host certificate; None with ``insecure``. UsageError when none is set up."""
    if insecure:
        return None
    for candidate in (given, config.tls_dir):
        if candidate is not None:
            if not Path(candidate).is_dir():
                raise UsageError(f"TLS directory {candidate} does not exist")
            return Path(candidate)
    default = store_dir / "tls"
    from appliance.peer import tls  # X.509: not for a plaintext (--insecure) pull

    if (default / tls.HOST_CERT).exists():
        return default
    raise UsageError(
        "peers talk mutual TLS: pass --tls-dir DIR (made by 'appliance site enroll'), set "
        f"tls_dir in the site config, put the directory at {default}, or pass --insecure"
    )


def connection(store_dir: Path, config: discovery.SiteConfig, given: Path | None,
               insecure: bool) -> Connection:
    directory = tls_dir(store_dir, config, given, insecure)
    return Connection(connect_policy(directory, insecure), directory)


def known_peers(config: discovery.SiteConfig, *, extra: Iterable[str] = (),
                extra_source: str = "command line", mdns: bool = True,
                browse_seconds: float = 2.0, warn: Warn | None = None) -> list[discovery.Peer]:
    """The static list, then ``extra`` URLs, then what mDNS finds; each URL once."""
    peers = {p.url: p for p in discovery.static_peers(config)}
    for url in extra:
        peers.setdefault(url, discovery.Peer(url, url.split("://", 1)[-1], extra_source))
    if mdns:
        try:
            for p in discovery.browse(browse_seconds):
                peers.setdefault(p.url, p)
        except (PeerError, OSError) as e:  # no multicast here: the other peers still work
            if warn is not None:
                warn(f"mDNS: {e}; using the static list only")
    return list(peers.values())


def usable(peers: Sequence[discovery.Peer], policy: ConnectPolicy
           ) -> tuple[list[discovery.Peer], list[PeerView]]:
    """(the peers the connection policy allows, with normalized URLs; those it refuses)."""
    allowed, refused = [], []
    for p in peers:
        try:
            allowed.append(discovery.Peer(policy.check(p.url), p.name, p.source))
        except UsageError as e:
            refused.append(PeerView(p.url, p.source, p.name, None, (), str(e)))
    return allowed, refused


def describe(peer: discovery.Peer, policy: ConnectPolicy) -> PeerView:
    """Ask one peer who it is and what it holds."""
    try:
        with PeerClient(peer.url, policy, timeouts=DESCRIBE_TIMEOUTS) as client:
            return PeerView(peer.url, peer.source, peer.name, client.info().host,
                            tuple(client.manifests()), None)
    except ApplianceError as e:
        return PeerView(peer.url, peer.source, peer.name, None, (), f"{type(e).__name__}: {e}")


def list_peers(peers: Sequence[discovery.Peer], policy: ConnectPolicy) -> list[PeerView]:
    """Every peer with what it holds (asked in parallel); refused ones say why, last."""
    allowed, refused = usable(peers, policy)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(allowed)))) as pool:
        return list(pool.map(lambda p: describe(p, policy), allowed)) + refused
