"""``appliance tui``: the operator's terminal UI (media, inspect, import, models, peers,
serve, trust, audit)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
The terminal UI for the operator inside the site: find a bundle on removable media, inspect
who signed it and verify every byte, import it into the store, then serve a model and try it
in a chat panel. Also shows LAN peers, the trust root and the audit log.
Every action has a key (shown at the bottom; '?' lists all) and is in the command palette
(ctrl+p). Long work runs in the background and can be cancelled.
"""
EPILOG = """\
examples:
  appliance tui
  appliance tui --store /srv/appliance --media /media/usb/bundle
  appliance tui --peer https://host-b:8765 --tls-dir /etc/appliance/tls
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "tui", parents=[common], help="the operator's terminal UI",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--media", nargs="+", action="extend", default=[], type=Path,
                        metavar="PATH", help="bundle or volume directories to offer besides "
                        "what is found under /media, /run/media and /mnt")
    parser.add_argument("--no-scan", action="store_true",
                        help="do not scan the usual mount points; show only --media paths")
    parser.add_argument("--peer", nargs="+", action="extend", default=[], metavar="URL",
                        help="peer URLs to offer on the Peers screen besides the site config's "
                        "and those found by mDNS")
    parser.add_argument("--tls-dir", type=Path, metavar="DIR",
                        help="this host's site TLS directory for peers (default: the site "
                        "config's, else STORE/tls)")
    parser.add_argument("--insecure", action="store_true",
                        help="talk plaintext HTTP to peers (trusted test LANs only)")
    parser.add_argument("--no-mdns", action="store_true", help="do not browse for peers")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from appliance.tui.app import create_app  # Textual loads only for this command

    app = create_app(args.store, media=args.media, scan_roots=() if args.no_scan else None,
                     peers=args.peer, tls_dir=args.tls_dir, insecure=args.insecure,
                     mdns=not args.no_mdns)
    app.run()
    return 0
