"""``appliance keys generate``: make an Ed25519 signing key pair for a ceremony or for tests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.paths import PASSPHRASE_ENV

DESCRIPTION = f"""\
Generate an Ed25519 key pair: DIR/NAME.key (PKCS#8 PEM, mode 0600, encrypted with the
passphrase from ${PASSPHRASE_ENV} or typed twice at a prompt) and DIR/NAME.pub (public,
safe to publish and to commit under keys/). Prints the key id that trust roots and signatures
use, and a fingerprint of words to read aloud when the public key changes hands.

Root keys belong on offline machines; see keys/README.md for the signing ceremony. Existing
files are never overwritten. --unencrypted writes a plain private key: for tests only.
"""

EPILOG = f"""\
examples:
  appliance keys generate alice-root --out /media/alice-usb
  {PASSPHRASE_ENV}=... appliance keys generate acme-publisher --out ./private
  appliance keys generate test-key --out /tmp/k --unencrypted
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    keys = sub.add_parser(
        "keys",
        parents=[common],
        help="make signing key pairs",
        description="Manage Ed25519 signing keys (root and publisher keys).",
        epilog="example:\n  appliance keys generate alice-root --out /media/alice-usb\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    gen = keys_sub.add_parser(
        "generate",
        parents=[common],
        help="generate NAME.key (encrypted) and NAME.pub",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("name", metavar="NAME", help="key name: file stem and label in trust roots")
    gen.add_argument(
        "--out", type=Path, required=True, metavar="DIR",
        help="directory for NAME.key and NAME.pub (created with mode 0700 if missing)",
    )
    gen.add_argument(
        "--unencrypted", action="store_true",
        help="write the private key without a passphrase (test keys only)",
    )
    gen.set_defaults(func=run_generate)
    show = keys_sub.add_parser(
        "show",
        parents=[common],
        help="print the key id and fingerprint words of public key files",
        description=(
            "Print the key id and fingerprint words of each NAME.pub, to compare with the "
            "ceremony sheet before a key goes into a trust root."
        ),
        epilog="example:\n  appliance keys show keys/root/*.pub\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("pubs", nargs="+", type=Path, metavar="PUB", help="public key file")
    show.set_defaults(func=run_show)


def run_generate(args: argparse.Namespace) -> int:
    from appliance.format.signing import fingerprint_words, key_id
    from appliance.keyfiles import (
        generate_keypair,
        load_public_key,
        new_passphrase_from_env_or_prompt,
        passphrase_warning,
    )
    passphrase = None if args.unencrypted else new_passphrase_from_env_or_prompt(args.name)
    warning = passphrase_warning(passphrase) if passphrase else None
    if warning:
        print(f"appliance: warning: {warning}", file=sys.stderr)
    key_path, pub_path = generate_keypair(args.name, args.out, passphrase)
    public = load_public_key(pub_path)
    print(f"private key: {key_path} ({'UNENCRYPTED' if passphrase is None else 'encrypted'})")
    print(f"public key:  {pub_path}")
    print(f"key id:      {key_id(public)}")
    print(f"fingerprint: {fingerprint_words(public)}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from appliance.format.signing import fingerprint_words, key_id
    from appliance.keyfiles import load_public_key
    for path in args.pubs:
        public = load_public_key(path)
        print(f"{path}  {key_id(public)}  {fingerprint_words(public)}")
    return 0
