"""``appliance torrent make|seed|fetch|enroll``: BitTorrent v2 swarms, trust from the manifest."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli.jsonout import print_json
from appliance.cli.options import LibraryDefault, override_options
from appliance.cli.store import byte_progress
from appliance.errors import UsageError
from appliance.store.layout import human_bytes

if TYPE_CHECKING:
    from appliance.torrent.certs import TorrentIdentity
    from appliance.torrent.session import SwarmOptions

DESCRIPTION = """\
BitTorrent v2 (BEP 52, libtorrent) for many sites, WAN links and big swarms. BitTorrent moves
bytes; the signed manifest decides trust: every torrent carries the manifest, its signatures
and the trust chain, a fetch authenticates them against THIS host's trust root before any
file byte is asked for, and every chunk is checked against the signed manifest before it is
written. Swarms are SSL torrents with the site CA (--tls-dir with a torrent certificate from
'appliance torrent enroll'); plaintext only with --insecure. Peers: --peer HOST:PORT and local
service discovery; the DHT only with --dht. See docs/TORRENT.md.
"""
MAKE_DESCRIPTION = """\
Write the .torrent of one model: the same model gives the same bytes, whether it is made from
the store or, with --media, from the bundle on media before it is imported (the media is
authenticated against this store's trust root and the model's files are decompressed, checked
chunk by chunk, into STORE/torrent-scratch while they are hashed: the model's size must be
free there).
"""
SEED_DESCRIPTION = """\
Seed published models read-only (each torrent made here: the bytes 'torrent make' writes).
A model still importing (a media import, a peer pull or a torrent fetch under way or
stopped) is seeded with --torrent FILE, its torrent made elsewhere or with 'torrent make
--media': the pieces whose chunks the store has verified are offered at once, and more as the
import goes on (the index is asked every second whether anything changed; new pieces are
offered within about 5 s).
"""
EPILOG = """\
examples:
  appliance torrent enroll --ca /media/site-ca --tls-dir /etc/appliance/tls
  appliance torrent make gemma3-270m -o gemma3-270m.torrent
  appliance torrent make gemma3-270m --media /media/usb --insecure
  appliance torrent seed --listen 0.0.0.0:6881
  appliance torrent seed --torrent gemma3-270m.torrent   # while its import runs
  appliance torrent fetch gemma3-270m.torrent --peer 10.0.0.5:6881
"""


def _formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def _connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tls-dir", type=Path, metavar="DIR",
                       help="this host's TLS directory (site CA, torrent certificate)")
    group.add_argument("--insecure", action="store_true",
                       help="a plaintext torrent, no site certificates (lab use only)")
    parser.add_argument("--site-config", type=Path, metavar="FILE",
                        help="site config with tls_dir (default: $STORE/site.yaml)")


def _swarm(parser: argparse.ArgumentParser, listen: str | LibraryDefault) -> None:
    parser.add_argument("--listen", default=listen, metavar="HOST:PORT",
                        help="libtorrent's listen address (default: %(default)s)")
    parser.add_argument("--peer", dest="peers", action="append", default=[],
                        metavar="HOST:PORT", help="a peer to connect to (repeatable)")
    parser.add_argument("--no-lsd", dest="lsd", action="store_false",
                        help="no local service discovery on the LAN")
    parser.add_argument("--dht", action="store_true",
                        help="use the public DHT (off by default)")
    parser.add_argument("--utp", action="store_true",
                        help="also use uTP (yields to other traffic; default: TCP only)")
    parser.add_argument("--upload-rate", type=float, metavar="MB/S",
                        help="cap the upload rate in megabytes per second")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    top = sub.add_parser("torrent", parents=[common],
                         help="BitTorrent v2 swarms (many sites, WAN), verified by the manifest",
                         description=DESCRIPTION, epilog=EPILOG, formatter_class=_formatter())
    ts = top.add_subparsers(dest="torrent_command", metavar="SUBCOMMAND", required=True)

    mk = ts.add_parser("make", parents=[common], help="write a model's .torrent (deterministic)",
                       formatter_class=_formatter(), description=MAKE_DESCRIPTION)
    mk.add_argument("model", metavar="MODEL",
                    help="NAME or NAME:VERSION: published in the store, or in the bundle "
                         "on --media")
    mk.add_argument("--media", dest="media", action="append", type=Path, default=[],
                    metavar="DIR", help="make it from this bundle media (a volume or a media "
                    "directory; repeatable) instead of the store, before any import")
    mk.add_argument("-o", "--output", type=Path, metavar="FILE",
                    help="where to write it (default: NAME-VERSION.torrent)")
    _connection(mk)
    mk.set_defaults(func=run_make)

    sd = ts.add_parser("seed", parents=[common], help="seed the store's published models",
                       formatter_class=_formatter(), description=SEED_DESCRIPTION)
    sd.add_argument("models", nargs="*", metavar="MODEL", help="default: every published one")
    sd.add_argument("--torrent", dest="torrents", action="append", type=Path, default=[],
                    metavar="FILE", help="also seed this model's .torrent: published, or "
                    "still importing (its verified pieces; repeatable)")
    sd.add_argument("--write-torrents", type=Path, metavar="DIR",
                    help="also write each seeded model's .torrent into DIR")
    _swarm(sd, LibraryDefault("appliance.torrent.session", "DEFAULT_PORT", "0.0.0.0:{}"))
    _connection(sd)
    sd.set_defaults(func=run_seed)

    ft = ts.add_parser("fetch", parents=[common], help="fetch a model from a swarm, verified",
                       formatter_class=_formatter())
    ft.add_argument("torrent", metavar="TORRENT|MAGNET", help=".torrent file or magnet link")
    ft.add_argument("--timeout", type=float, metavar="S",
                    default=LibraryDefault("appliance.torrent.fetch",
                                           "FetchOptions.wait_for_pieces"),
                    help="give up when no piece arrives for S seconds (default: %(default)s)")
    ft.add_argument("--allow-expired", action="store_true",
                    help="accept an expired bundle (needs --reason; audited)")
    ft.add_argument("--reason", metavar="TEXT", help="why an expired bundle is accepted")
    ft.add_argument("--json", action="store_true", help="print JSON")
    _swarm(ft, "0.0.0.0:0")
    _connection(ft)
    ft.set_defaults(func=run_fetch)

    en = ts.add_parser("enroll", parents=[common],
                       help="issue this host's torrent certificate from the site CA",
                       formatter_class=_formatter())
    en.add_argument("--ca", type=Path, required=True, metavar="CA_DIR",
                    help="the site CA directory ('appliance site init')")
    en.add_argument("--tls-dir", type=Path, metavar="DIR",
                    help="this host's TLS directory ('appliance site enroll'; default: "
                         "the site config's, else $STORE/tls)")
    en.add_argument("--site-config", type=Path, metavar="FILE")
    en.set_defaults(func=run_enroll, insecure=False)


def _tls_dir(args: argparse.Namespace) -> Path | None:
    from appliance.peer import site
    config = site.site_config(args.store, args.site_config)
    return site.tls_dir(args.store, config, args.tls_dir, args.insecure)


def _identity(args: argparse.Namespace) -> TorrentIdentity | None:
    from appliance.torrent.certs import load_torrent_identity
    directory = _tls_dir(args)
    return None if directory is None else load_torrent_identity(directory)


def _options(args: argparse.Namespace) -> SwarmOptions:
    from appliance.torrent.session import SwarmOptions
    rate = int(args.upload_rate * 1e6) if args.upload_rate else 0
    return SwarmOptions(listen=args.listen, peers=tuple(args.peers), lsd=args.lsd,
                        dht=args.dht, utp=args.utp, upload_rate=rate)


def run_make(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from appliance.torrent.make import media_torrent, model_torrent
    identity = _identity(args)
    root_cert = identity.ca_pem if identity else None
    if args.media:
        data, ref = media_torrent(args.store, args.media, args.model, root_cert=root_cert,
                                  now=datetime.now(UTC))
    else:
        data, ref = model_torrent(args.store, args.model, root_cert=root_cert)
    out = args.output or Path(ref.replace("/", "~").replace(":", "-") + ".torrent")
    try:
        out.write_bytes(data)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e}") from e
    print(f"{out}: {ref}, {'SSL (site CA)' if identity else 'PLAINTEXT (--insecure)'}")
    return 0


def run_seed(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from appliance.torrent.fetch import read_torrent
    from appliance.torrent.partial import StagedSeeds
    from appliance.torrent.seed import Seeder
    identity = _identity(args)
    torrents = [read_torrent(path) for path in args.torrents]
    err = Console(stderr=True)
    seeder = Seeder(args.store, _options(args), identity=identity,
                    notify=lambda m: err.print(f"[yellow]{escape(m)}[/]"))
    staged: StagedSeeds | None = None
    try:
        seeded = seeder.add_published(args.models)
        staged = StagedSeeds(seeder)
        seeded += [staged.add(data) for data in torrents]
        for s in seeded:
            if args.write_torrents is not None:
                args.write_torrents.mkdir(parents=True, exist_ok=True)
                name = s.model.replace("/", "~").replace(":", "-") + ".torrent"
                (args.write_torrents / name).write_bytes(s.torrent)
            print(f"seeding {s.model} {s.infohash}", flush=True)
        print(f"listening on port {seeder.port}, "
              f"{'SSL (site CA)' if identity else 'PLAINTEXT (--insecure)'}", flush=True)
        stop: list[int] = []
        previous = {sig: signal.signal(sig, lambda n, _f: stop.append(n))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop:
                seeder.poll(500)
                staged.refresh()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if staged is not None:
            staged.close()
        seeder.close()
    print("stopped", flush=True)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from appliance.torrent.fetch import FetchOptions, fetch, read_torrent
    allow_expired, reason = override_options(args)
    identity = _identity(args)
    text = args.torrent
    torrent: bytes | str = text if text.startswith("magnet:") else read_torrent(Path(text))
    options = FetchOptions(swarm=_options(args), identity=identity,
                           wait_for_pieces=args.timeout, metadata_timeout=args.timeout,
                           allow_expired=allow_expired, reason=reason)
    err = Console(stderr=True)
    with byte_progress("fetch", transient=True, console=err) as progress:
        result = fetch(args.store, torrent, options=options, progress=progress,
                       notify=lambda m: err.print(f"[yellow]{escape(m)}[/]"))
    if args.json:
        print_json({"ok": result.complete, "model": result.model, "torrent": result.infohash,
                    "manifest": result.manifest_hash, "bytes_fetched": result.bytes_fetched,
                    "bytes_local": result.bytes_local, "hash_failures": result.hash_failures})
    else:
        state = "already present" if result.present else (
            "published" if result.complete else "incomplete")
        print(f"{result.model}: {state} ({result.channel} #{result.sequence}, "
              f"{human_bytes(result.bytes_fetched)} from the swarm, "
              f"{human_bytes(result.bytes_local)} copied locally)")
    return 0 if result.complete else 3


def run_enroll(args: argparse.Namespace) -> int:
    from appliance.torrent.certs import enroll_torrent
    directory = _tls_dir(args)
    assert directory is not None
    path = enroll_torrent(args.ca, directory)
    print(f"wrote {path} (and {path.with_suffix('.key').name}): SSL torrents of this site")
    sys.stdout.flush()
    return 0
