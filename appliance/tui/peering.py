"""The Peers screen's service side: which peers there are, what they hold, pulling from them.

Which peers, which TLS directory and what each peer holds are decided once, in
``appliance.peer.site``, for this screen and ``appliance peer`` alike: the site config's
static list, URLs the operator typed and an mDNS browse; mutual TLS with the site directory
(``--tls-dir``, the site config's ``tls_dir``, or ``STORE/tls``), plaintext only when the
operator asked for it. Pulling is
``appliance.peer.pull.pull``: the manifest is authenticated against this host's trust root
and every chunk checked on arrival. All calls block; the screen runs them in workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.peer import site
from appliance.peer.client import ConnectPolicy, PeerClient
from appliance.peer.pull import PullOptions, PullResult, pull
from appliance.peer.site import PeerView
from appliance.store.trust_state import require_override_reason

Progress = Callable[[int, int], None]
__all__ = ["PeerSettings", "PeerView", "list_peers", "policy_for", "pull_models"]


@dataclass(frozen=True)
class PeerSettings:
    tls_dir: Path | None
    insecure: bool
    extra_urls: tuple[str, ...] = ()
    mdns: bool = True
    browse_seconds: float = 1.5


def policy_for(store_dir: Path, settings: PeerSettings) -> tuple[ConnectPolicy, str]:
    """The connection policy and a line saying which it is (``appliance.peer.site``)."""
    conn = site.connection(store_dir, site.site_config(store_dir), settings.tls_dir,
                           settings.insecure)
    return conn.policy, conn.mode


def list_peers(store_dir: Path, settings: PeerSettings) -> tuple[str, list[PeerView]]:
    """(connection mode, every known peer with what it holds)."""
    config = site.site_config(store_dir)
    conn = site.connection(store_dir, config, settings.tls_dir, settings.insecure)
    peers = site.known_peers(config, extra=settings.extra_urls, extra_source="typed",
                             mdns=settings.mdns, browse_seconds=settings.browse_seconds)
    return conn.mode, site.list_peers(peers, conn.policy)


def pull_models(store_dir: Path, settings: PeerSettings, urls: Sequence[str],
                refs: Sequence[str], *, now: datetime, progress: Progress | None = None,
                notify: Callable[[str], None] | None = None, reason: str | None = None,
                ) -> list[PullResult]:
    """Pull ``refs`` (all offered models when empty) from every peer in ``urls``."""
    require_override_reason(reason is not None, reason)
    policy, _ = policy_for(store_dir, settings)
    clients = [PeerClient(policy.check(u), policy) for u in dict.fromkeys(urls)]
    options = PullOptions(allow_expired=reason is not None, reason=reason)
    try:
        return pull(store_dir, clients, list(refs), all_models=not refs, options=options,
                    progress=progress, notify=notify, now=now)
    finally:
        for client in clients:
            client.close()
