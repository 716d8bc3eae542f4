"""The Peers screen's service side: which peers there are, what they hold, pulling from them.

Peers come from the site config's static list (``appliance.peer.discovery``), an mDNS browse,
and URLs the operator typed. Connections follow the same policy as ``appliance peer``:
mutual TLS with the site directory (``--tls-dir``, the site config's ``tls_dir``, or
``STORE/tls``), plaintext only when the operator asked for it. Pulling is
``appliance.peer.pull.pull``: the manifest is authenticated against this host's trust root
and every chunk checked on arrival. All calls block; the screen runs them in workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.errors import ApplianceError, PeerError, UsageError
from appliance.peer import discovery, tls
from appliance.peer.client import ConnectPolicy, PeerClient, Timeouts, connect_policy
from appliance.peer.protocol import ManifestSummary
from appliance.peer.pull import PullOptions, PullResult, pull

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PeerView:
    url: str
    source: str  # static | mdns | typed
    host: str | None
    holds: tuple[ManifestSummary, ...]
    problem: str | None  # unreachable or refused: why

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.ref for s in self.holds for m in s.models))


@dataclass(frozen=True)
class PeerSettings:
    tls_dir: Path | None
    insecure: bool
    extra_urls: tuple[str, ...] = ()
    mdns: bool = True
    browse_seconds: float = 1.5


def tls_dir_for(store_dir: Path, config: discovery.SiteConfig,
                given: Path | None) -> Path | None:
    """The site TLS directory: the one given, the site config's, else ``STORE/tls``."""
    for candidate in (given, config.tls_dir):
        if candidate is not None:
            return Path(candidate)
    default = store_dir / "tls"
    return default if (default / tls.HOST_CERT).exists() else None


def policy_for(store_dir: Path, settings: PeerSettings) -> tuple[ConnectPolicy, str]:
    """The connection policy and a line saying which it is."""
    config = discovery.load_site_config(discovery.default_site_config(store_dir))
    tls_dir = None if settings.insecure else tls_dir_for(store_dir, config, settings.tls_dir)
    if tls_dir is None and not settings.insecure:
        raise UsageError(
            "peers talk mutual TLS, and this host has no site certificate: run 'appliance "
            f"site enroll' (or put it in {store_dir / 'tls'}), or start the TUI with --insecure "
            "on a trusted test LAN"
        )
    mode = f"mutual TLS ({tls_dir})" if tls_dir else "PLAINTEXT (--insecure)"
    return connect_policy(tls_dir, settings.insecure), mode


def _describe(url: str, source: str, policy: ConnectPolicy) -> PeerView:
    try:
        with PeerClient(url, policy, timeouts=Timeouts(connect=3, read=5)) as client:
            return PeerView(url, source, client.info().host, tuple(client.manifests()), None)
    except ApplianceError as e:
        return PeerView(url, source, None, (), f"{type(e).__name__}: {e}")


def list_peers(store_dir: Path, settings: PeerSettings) -> tuple[str, list[PeerView]]:
    """(connection mode, every known peer with what it holds)."""
    policy, mode = policy_for(store_dir, settings)
    config = discovery.load_site_config(discovery.default_site_config(store_dir))
    found: dict[str, str] = {p.url: "static" for p in discovery.static_peers(config)}
    for url in settings.extra_urls:
        found.setdefault(policy.check(url), "typed")
    if settings.mdns:
        try:
            for p in discovery.browse(settings.browse_seconds):
                found.setdefault(p.url, "mdns")
        except (PeerError, OSError):
            pass  # no multicast here: the static and typed peers still work
    usable: list[tuple[str, str]] = []
    views: list[PeerView] = []
    for url, source in found.items():
        try:
            usable.append((policy.check(url), source))
        except UsageError as e:
            views.append(PeerView(url, source, None, (), str(e)))
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(usable)))) as pool:
        views = list(pool.map(lambda us: _describe(us[0], us[1], policy), usable)) + views
    return mode, views


def pull_models(store_dir: Path, settings: PeerSettings, urls: Sequence[str],
                refs: Sequence[str], *, now: datetime, progress: Progress | None = None,
                notify: Callable[[str], None] | None = None, reason: str | None = None,
                ) -> list[PullResult]:
    """Pull ``refs`` (all offered models when empty) from every peer in ``urls``."""
    policy, _ = policy_for(store_dir, settings)
    clients = [PeerClient(policy.check(u), policy) for u in dict.fromkeys(urls)]
    options = PullOptions(allow_expired=reason is not None, reason=reason)
    try:
        return pull(store_dir, clients, list(refs), all_models=not refs, options=options,
                    progress=progress, notify=notify, now=now)
    finally:
        for client in clients:
            client.close()
