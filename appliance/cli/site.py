"""``appliance site init|enroll``: the site CA and host certificates peers use for mutual TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli.options import LibraryDefault

INIT_DESCRIPTION = """\
Make the site CA: an ECDSA P-256 key (ca.key, mode 0600) and a self-signed certificate
(ca.crt) in DIR. Every host of the site gets a certificate signed by this CA
('appliance site enroll'); peers talk mutual TLS and refuse any host without one. Keep DIR
(ca.key above all) off the LAN, e.g. on the operator's removable disk. Never overwrites.
"""
INIT_EPILOG = """\
example:
  appliance site init --out /media/operator/site-ca
"""
ENROLL_DESCRIPTION = """\
Issue HOSTNAME a key and a certificate signed by the site CA in --ca, written with a copy of
ca.crt into --out: that directory is the host's TLS directory (--tls-dir of 'appliance peer',
or tls_dir in the site config). The certificate names HOSTNAME, 127.0.0.1 and ::1, plus every
--ip given. Never overwrites.
"""
ENROLL_EPILOG = """\
examples:
  appliance site enroll host-b --ca /media/operator/site-ca --out ./host-b-tls --ip 10.0.0.12
  # then copy ./host-b-tls to host-b, e.g. into $APPLIANCE_HOME/tls
"""


def _formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    site = sub.add_parser(
        "site",
        parents=[common],
        help="make the site CA and enrol hosts (mutual TLS between peers)",
        description="Site membership: a site CA and one certificate per host.",
        epilog="example:\n  appliance site init --out ca && appliance site enroll host-a "
               "--ca ca --out host-a-tls\n",
        formatter_class=_formatter(),
    )
    ss = site.add_subparsers(dest="site_command", metavar="SUBCOMMAND", required=True)
    init = ss.add_parser("init", parents=[common], help="make the site CA",
                         description=INIT_DESCRIPTION, epilog=INIT_EPILOG,
                         formatter_class=_formatter())
    init.add_argument("--out", type=Path, required=True, metavar="DIR",
                      help="directory to write ca.key and ca.crt into")
    init.add_argument("--name", default="appliance site CA",
                      help="the CA's common name (default: %(default)s)")
    init.add_argument("--days", type=int,
                      default=LibraryDefault("appliance.peer.tls", "DEFAULT_CA_DAYS"),
                      help="validity in days (default: %(default)s)")
    init.set_defaults(func=run_init)

    enroll = ss.add_parser("enroll", parents=[common], help="issue a host certificate",
                           description=ENROLL_DESCRIPTION, epilog=ENROLL_EPILOG,
                           formatter_class=_formatter())
    enroll.add_argument("hostname", metavar="HOSTNAME", help="the host's name (DNS SAN and CN)")
    enroll.add_argument("--ca", type=Path, required=True, metavar="DIR",
                        help="the site CA directory made by 'appliance site init'")
    enroll.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the host's TLS directory to write host.key, host.crt, ca.crt")
    enroll.add_argument("--ip", action="append", default=[], metavar="IP",
                        help="an address the host is reached at (repeatable)")
    enroll.add_argument("--days", type=int,
                        default=LibraryDefault("appliance.peer.tls", "DEFAULT_HOST_DAYS"),
                        help="validity in days (default: %(default)s, capped at the CA's)")
    enroll.set_defaults(func=run_enroll)


def run_init(args: argparse.Namespace) -> int:
    from appliance.peer import tls

    ca = tls.init_site(args.out, name=args.name, days=args.days)
    print(f"site CA:      {ca.subject}")
    print(f"certificate:  {ca.cert_path}")
    print(f"key:          {ca.key_path} (keep it off the LAN)")
    print(f"fingerprint:  sha256 {ca.fingerprint}")
    print(f"valid until:  {ca.not_after:%Y-%m-%d}")
    return 0


def run_enroll(args: argparse.Namespace) -> int:
    from appliance.peer import tls
    host = tls.enroll_host(args.hostname, args.ca, args.out, ips=args.ip, days=args.days)
    print(f"host:         {host.hostname}")
    print(f"addresses:    {', '.join(host.ips)}")
    print(f"TLS dir:      {host.directory} (host.key, host.crt, ca.crt)")
    print(f"fingerprint:  sha256 {host.fingerprint}")
    print(f"site CA:      sha256 {host.ca_fingerprint}")
    print(f"valid until:  {host.not_after:%Y-%m-%d}")
    return 0
