"""``appliance peer serve|list|pull``: share the store with LAN peers and pull from them."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli.jsonout import print_json
from appliance.cli.options import LibraryDefault, override_options
from appliance.cli.store import byte_progress
from appliance.errors import PeerError, UsageError
from appliance.peer.protocol import DEFAULT_PORT, SERVICE_TYPE
from appliance.store.layout import human_bytes

if TYPE_CHECKING:
    from rich.console import Console

    from appliance.peer import discovery, site

SERVE_DESCRIPTION = f"""\
Serve this host's store to the site: its signed manifests, a have-map of the chunks it holds
(imports and pulls still running included) and chunks by digest, each re-checked before it
is sent. Peers talk mutual TLS with certificates from the site CA (--tls-dir, else tls_dir in
the site config, else $STORE/tls); plaintext only with --insecure. The server advertises
itself by mDNS ({SERVICE_TYPE}) unless --no-advertise. Stop it with Ctrl-C.
"""
SERVE_EPILOG = f"""\
examples:
  appliance peer serve --tls-dir /etc/appliance/tls
  appliance peer serve --listen 10.0.0.12:{DEFAULT_PORT} --rate-limit 50 --no-advertise
  appliance peer serve --insecure --listen 127.0.0.1:9000    # a lab test, no TLS
"""
LIST_DESCRIPTION = """\
Peers found by mDNS and in the static list of the site config, each asked what it holds
(manifest channel and sequence, models, complete or partial). What peers say here is a hint;
a pull authenticates every manifest and chunk against this host's trust root.
"""
LIST_EPILOG = """\
examples:
  appliance peer list
  appliance peer list --no-mdns --json
"""
PULL_DESCRIPTION = """\
Fetch models from peers: the newest manifest offering them is verified against THIS host's
trust root, rollback and expiry rules before any chunk is fetched; then chunks come from
every peer holding them, in parallel, each checked on arrival and written into the store like
an import (published only when complete). A peer sending bad bytes is dropped and the chunk
fetched elsewhere. An interrupted pull resumes where it stopped when run again. Peers: --from,
else the site config's static list and mDNS.
"""
PULL_EPILOG = """\
examples:
  appliance peer pull gemma3-270m
  appliance peer pull tiny:1 --from https://10.0.0.5:8765 --from https://10.0.0.6:8765
  appliance peer pull --all
"""


def _formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tls-dir", type=Path, metavar="DIR",
                       help="this host's TLS directory from 'appliance site enroll'")
    group.add_argument("--insecure", action="store_true",
                       help="plaintext HTTP without site certificates (lab use only)")
    parser.add_argument("--site-config", type=Path, metavar="FILE",
                        help="site config with static peers and tls_dir "
                             "(default: $STORE/site.yaml)")


def _discovery_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-mdns", dest="mdns", action="store_false",
                        help="do not look for peers by mDNS, only the static list")
    parser.add_argument("--browse-seconds", type=float, default=2.0, metavar="S",
                        help="how long to listen for mDNS answers (default: %(default)s)")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    peer = sub.add_parser(
        "peer", parents=[common], help="serve the store to LAN peers, list them, pull from them",
        description="LAN sharing: one USB import seeds the whole site.",
        epilog="example:\n  appliance peer serve & appliance peer pull --all\n",
        formatter_class=_formatter(),
    )
    ps = peer.add_subparsers(dest="peer_command", metavar="SUBCOMMAND", required=True)

    serve = ps.add_parser("serve", parents=[common], help="serve this store to peers",
                          description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG,
                          formatter_class=_formatter())
    serve.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", metavar="HOST:PORT",
                       help="address to listen on (default: %(default)s)")
    serve.add_argument("--advertise", action=argparse.BooleanOptionalAction, default=True,
                       help="announce this server by mDNS (default: on)")
    serve.add_argument("--rate-limit", type=float, metavar="MB/S",
                       help="cap the total upload rate in megabytes per second")
    serve.add_argument("--max-connections", type=int, metavar="N",
                       default=LibraryDefault("appliance.peer.server",
                                              "ServerOptions.max_connections"),
                       help="connections served at once; more get 503 "
                       "(default: %(default)s)")
    _connection_options(serve)
    serve.set_defaults(func=run_serve)

    lst = ps.add_parser("list", parents=[common], help="peers on the LAN and what they hold",
                        description=LIST_DESCRIPTION, epilog=LIST_EPILOG,
                        formatter_class=_formatter())
    lst.add_argument("--json", action="store_true", help="print JSON")
    _connection_options(lst)
    _discovery_options(lst)
    lst.set_defaults(func=run_list)

    pl = ps.add_parser("pull", parents=[common], help="fetch models from peers, verified",
                       description=PULL_DESCRIPTION, epilog=PULL_EPILOG,
                       formatter_class=_formatter())
    pl.add_argument("models", nargs="*", metavar="MODEL", help="NAME or NAME:VERSION")
    pl.add_argument("--from", dest="sources", action="append", default=[], metavar="URL",
                    help="a peer to pull from (repeatable); default: site config and mDNS")
    pl.add_argument("--all", action="store_true", help="every model the peers offer")
    pl.add_argument("--per-peer", type=int, metavar="N",
                    default=LibraryDefault("appliance.peer.pull", "PullOptions.per_peer"),
                    help="chunk requests in flight per peer (default: %(default)s)")
    pl.add_argument("--timeout", type=float, metavar="S",
                    default=LibraryDefault("appliance.peer.client", "Timeouts.read"),
                    help="give up on a peer that sends nothing for S seconds "
                         "(default: %(default)s)")
    pl.add_argument("--allow-expired", action="store_true",
                    help="accept an expired bundle (needs --reason; audited)")
    pl.add_argument("--reason", metavar="TEXT", help="why an expired bundle is accepted")
    _connection_options(pl)
    _discovery_options(pl)
    pl.set_defaults(func=run_pull)


# --- shared ---------------------------------------------------------------------------------


def _site(args: argparse.Namespace) -> tuple[discovery.SiteConfig, site.Connection]:
    from appliance.peer import site
    config = site.site_config(args.store, args.site_config)
    return config, site.connection(args.store, config, args.tls_dir, args.insecure)


def _peers(args: argparse.Namespace, config: discovery.SiteConfig, err: Console
           ) -> list[discovery.Peer]:
    from rich.markup import escape

    from appliance.peer import site
    return site.known_peers(config, mdns=args.mdns, browse_seconds=args.browse_seconds,
                            warn=lambda m: err.print(f"[yellow]{escape(m)}[/]"))


# --- serve ----------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.http_server import parse_listen
    from appliance.peer import discovery
    from appliance.peer.server import ServerOptions, serve_store
    _, conn = _site(args)
    tls_dir = conn.tls_dir
    host, port = parse_listen(args.listen)
    name = discovery.host_name()
    server = serve_store(
        args.store, host=host, port=port, tls_dir=tls_dir, insecure=args.insecure,
        host_name=name, rate_limit=args.rate_limit * 1e6 if args.rate_limit else None,
        options=ServerOptions(max_connections=args.max_connections),
    )
    err = Console(stderr=True, soft_wrap=True)  # a notice is one line, however long
    print(f"serving {args.store} on {server.url} as {name}, {conn.mode}", flush=True)
    advertiser = None
    if args.advertise:
        addresses = discovery.local_addresses() if host in ("0.0.0.0", "") else [host]
        try:
            advertiser = discovery.Advertiser(name, server.port, scheme=server.scheme,
                                              addresses=addresses).start()
            print(f"advertising {advertiser.info.name} on {', '.join(addresses)}", flush=True)
        except (PeerError, UsageError) as e:
            err.print(f"[yellow]not advertised by mDNS: {e}[/]")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handlers it found; no-op ones make a requested stop exit 0 instead of dying by signal.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if advertiser is not None:
            advertiser.close()
    print("stopped", flush=True)
    return 0


def _stopped(signum: int, frame: object) -> None:
    pass


# --- list -----------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from appliance.peer import site
    config, conn = _site(args)
    err = Console(stderr=True, soft_wrap=True)  # a notice is one line, however long
    views = site.list_peers(_peers(args, config, err), conn.policy)
    if args.json:
        print_json([v.to_json() for v in views])
        return 0
    if not views:
        print("no peers found (static list empty, no mDNS answers)")
        return 0
    table = Table("peer", "from", "host", "holds")
    for v in views:
        if v.problem is not None:
            holds = f"[red]{escape(v.problem)}[/]"
        else:
            holds = "\n".join(
                f"{s.channel} #{s.sequence}{'' if s.complete else ' (partial)'}: "
                + ", ".join(m.ref for m in s.models)
                for s in v.holds
            ) or "nothing"
        table.add_row(v.url, v.source, v.host or "?", holds)
    Console().print(table)
    return 0


# --- pull -----------------------------------------------------------------------------------


def run_pull(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from appliance.peer import site
    from appliance.peer.client import PeerClient, Timeouts
    from appliance.peer.pull import PullOptions, pull
    if args.all and args.models:
        raise UsageError("give MODEL names or --all, not both")
    if not args.all and not args.models:
        raise UsageError("name the models to pull, or pass --all")
    allow_expired, reason = override_options(args)
    config, conn = _site(args)
    policy = conn.policy
    err = Console(stderr=True, soft_wrap=True)  # a notice is one line, however long
    if args.sources:
        urls = [policy.check(u) for u in args.sources]
    else:
        allowed, refused = site.usable(_peers(args, config, err), policy)
        for v in refused:
            err.print(f"[yellow]skipping {escape(v.url)} ({v.source}): "
                      f"{escape(v.problem or '')}[/]")
        urls = [p.url for p in allowed]
    if not urls:
        raise PeerError("no peers: give --from URL, list peers in the site config, or start "
                        "'appliance peer serve' on a host that has the models")
    timeouts = Timeouts(read=args.timeout)
    clients = [PeerClient(u, policy, timeouts=timeouts, max_connections=args.per_peer)
               for u in dict.fromkeys(urls)]
    options = PullOptions(per_peer=args.per_peer, allow_expired=allow_expired, reason=reason)
    try:
        with byte_progress("pull", transient=True, console=err) as progress:
            results = pull(args.store, clients, args.models, all_models=args.all,
                           options=options, progress=progress,
                           notify=lambda m: err.print(f"[yellow]{escape(m)}[/]"))
    finally:
        for c in clients:
            c.close()
    for r in results:
        fresh = [m for m in r.models if m not in r.present]
        print(f"{r.channel} #{r.sequence} ({r.manifest_hash[:16]}): "
              f"pulled {', '.join(fresh) or 'nothing new'}"
              + (f"; already present: {', '.join(r.present)}" if r.present else ""))
        print(f"  {human_bytes(r.bytes_fetched)} from peers, {human_bytes(r.bytes_local)} "
              "copied locally"
              + "".join(f"\n  {u}: {human_bytes(n)}" for u, n in sorted(r.by_peer.items())))
        for u, why in r.dropped.items():
            print(f"  dropped {u}: {why}")
    return 0
