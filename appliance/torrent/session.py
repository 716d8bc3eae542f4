"""libtorrent session settings for appliance swarms, and the small helpers around a handle.

``open_session(options, secure=...)`` makes a session that contacts no one by itself: no UPnP
or NAT-PMP (they talk to the router); the DHT off unless ``dht=True`` (then libtorrent's
default bootstrap nodes, for swarms across sites); local service discovery (LSD, multicast on
the LAN) on unless turned off; TCP only unless ``utp=True``; the static peers of
``SwarmOptions.peers`` connected by the caller (``connect_peers``). With ``secure`` the listen
socket is libtorrent's SSL listener (the port given): SSL torrents accept only peers
presenting a certificate from the torrent's CA (the site CA, ``certs``), and a plaintext
torrent is not allowed at all without ``--insecure``. libtorrent errors are translated here
into ``PeerError`` / ``UsageError``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import libtorrent as lt

from appliance.errors import PeerError, UsageError
from appliance.http_server import parse_listen
from appliance.torrent.certs import DH_PARAMS, TorrentIdentity

DEFAULT_PORT = 6881
# Several hosts behind one NAT, or every host of a test on 127.0.0.1, share one address.
_BASE_SETTINGS: dict[str, Any] = {
    "enable_upnp": False,
    "enable_natpmp": False,
    "allow_multiple_connections_per_ip": True,
    "user_agent": "appliance",
    # piece_progress carries piece_finished: without it a fetch learns of a piece only at
    # its next have-scan (up to a second later), and its no-progress timer never resets.
    "alert_mask": (lt.alert.category_t.error_notification
                   | lt.alert.category_t.status_notification
                   | lt.alert.category_t.storage_notification
                   | lt.alert.category_t.peer_notification
                   | lt.alert.category_t.piece_progress_notification),
    # A LAN swarm of a few hosts: no reason to wait minutes between reconnects.
    "min_reconnect_time": 1,
    "peer_connect_timeout": 5,
    "announce_to_all_tiers": False,
    # Rarest first piece by piece, not in 4 MiB extents: with extents, fetchers starting
    # together picked the same few extents of a small model from the seed, which then sent
    # 2.4x the model at N = 8 (bench_torrent); a chunk waits a little longer to be whole.
    "piece_extent_affinity": False,
    # The BitTorrent form of an in-flight announcement: HAVE goes out this many ms before a
    # piece is expected to complete, so other fetchers count it as held and ask elsewhere.
    "predictive_piece_announce": 500,
    # libtorrent queues requests for request_queue_time seconds of a peer's rate (3 s, at
    # most 500 blocks): fetchers starting together each had a few MB queued at the one seed,
    # much of it the same pieces (the seed sent 2.1x the model at N = 8). A short queue per
    # peer, still deep enough for a LAN's round trip, leaves the seed's upload to pieces
    # nobody has yet and lets the others fetch the rest from each other.
    "request_queue_time": 1,
    "max_out_request_queue": 32,
    # libtorrent's default (20 s) makes a connection that could fetch a whole piece within
    # that time reserve runs of up to 8 MiB of contiguous pieces, all queued at that one peer:
    # at the seed's share of a capped link (about 1.2 MB/s at N = 8) a run took seconds, the
    # other fetchers, not seeing it, reserved the same pieces at the seed too, and the seed
    # sent 1.33-1.40x the model (bench_torrent at 400 MiB; its upload log showed the repeats
    # 1-8 s apart). Off: every connection asks block by block, rarest first, and the seed's link
    # sent 1.18-1.19x (Tt 1.19-1.21x T1 at N = 8, against 1.40x in the same run).
    "whole_pieces_threshold": 0,
    # --upload-rate means what it says on a LAN too (libtorrent exempts local peers).
    "ignore_limits_on_local_network": False,
}


@dataclass(frozen=True)
class SwarmOptions:
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    peers: tuple[str, ...] = ()  # HOST:PORT, connected directly (a static peer list)
    lsd: bool = True  # local service discovery on the LAN
    dht: bool = False  # the public DHT: only when asked (many sites, WAN)
    # uTP's LEDBAT yields to any other traffic and backs off as a capped link's queue fills:
    # meant for background seeding on home links, it left tc-capped site links half used in
    # bench_torrent. TCP by default; uTP when asked (NAT-friendly on the WAN).
    utp: bool = False
    upload_rate: int = 0  # bytes per second, 0 = no cap (benchmarks, tests)
    download_rate: int = 0


def parse_peer(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UsageError(f"--peer {text!r} must be HOST:PORT")
    return host, int(port)


def open_session(options: SwarmOptions, *, secure: bool) -> lt.session:
    host, port = parse_listen(options.listen, any_host="0.0.0.0")
    for peer in options.peers:
        parse_peer(peer)
    listen = f"[{host}]" if ":" in host else host
    settings = dict(_BASE_SETTINGS)
    settings.update({
        "listen_interfaces": f"{listen}:{port}{'s' if secure else ''}",
        "enable_dht": options.dht,
        "enable_lsd": options.lsd,
        "enable_outgoing_utp": options.utp,
        "enable_incoming_utp": options.utp,
        "upload_rate_limit": options.upload_rate,
        "download_rate_limit": options.download_rate,
    })
    try:
        session = lt.session(cast(Any, settings))
    except RuntimeError as e:
        raise UsageError(f"cannot start libtorrent on {options.listen}: {e}") from e
    _wait_listening(session, options.listen)
    return session


def _wait_listening(session: lt.session, listen: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for alert in session.pop_alerts():
            if isinstance(alert, lt.listen_failed_alert):
                raise UsageError(f"cannot listen on {listen}: {alert.message()}")
            if isinstance(alert, lt.listen_succeeded_alert):
                return
        session.wait_for_alert(100)
    raise UsageError(f"libtorrent did not start listening on {listen}")


def port(session: lt.session, *, secure: bool) -> int:
    return int(session.ssl_listen_port() if secure else session.listen_port())


def connect_peers(handle: lt.torrent_handle, peers: Sequence[str]) -> None:
    for text in peers:
        try:
            handle.connect_peer(parse_peer(text))
        except RuntimeError as e:
            raise PeerError(f"cannot connect to torrent peer {text}: {e}") from e


def present_certificate(handle: lt.torrent_handle, identity: TorrentIdentity) -> None:
    handle.set_ssl_certificate_buffer(identity.cert_pem, identity.key_pem, DH_PARAMS)


def add_flags(*names: str) -> Any:
    """``lt.torrent_flags`` by name, or'ed (the bindings give no typed flag constructor)."""
    value = 0
    for name in names:
        value |= getattr(lt.torrent_flags, name)
    return value
