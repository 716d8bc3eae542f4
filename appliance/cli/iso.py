"""``appliance iso verify IMAGE``: check an appliance image against its SHA256SUMS list."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from appliance.cli.jsonout import print_json
from appliance.cli.store import byte_progress
from appliance.iso import CHECKSUMS_NAME, verify
from appliance.store.layout import human_bytes

VERIFY_DESCRIPTION = f"""\
Check that every file of an appliance image made by build_iso.sh matches the {CHECKSUMS_NAME}
list on it, and that the image holds no file the list does not name. Run it before burning
(on the .iso file) and after (on the disc itself, /dev/sr0, or where the disc is mounted), so a
damaged burn is caught before anyone imports from it.

IMAGE is an .iso file or a block device (read directly: no mount, no xorriso needed), or a
directory: a mounted disc or an extracted image.

This catches damage, not forgery: whoever can write an image can rewrite its list. The models'
authenticity is checked by 'appliance bundle verify' and 'appliance import' against the trust
root. Exit status 2 when a file differs, is missing or is not listed.
"""
VERIFY_EPILOG = """\
examples:
  appliance iso verify appliance.iso
  appliance iso verify /dev/sr0
  appliance iso verify /media/cdrom
  cd /media/cdrom && sha256sum -c SHA256SUMS      # the same check with coreutils only
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "iso",
        parents=[common],
        help="check an appliance image (ISO) made by build_iso.sh",
        description="Work with appliance images: the ISO files build_iso.sh writes.",
        epilog="example:\n  appliance iso verify appliance.iso\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="iso_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "verify",
        parents=[common],
        help=f"check every file of an image against its {CHECKSUMS_NAME}",
        description=VERIFY_DESCRIPTION,
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("image", type=Path, metavar="IMAGE",
                       help="an .iso file, a block device, or a mounted disc directory")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    with byte_progress(f"checking {args.image.name}", enabled=not (args.json or args.quiet)) as p:
        report = verify(args.image, progress=p)
    if args.json:
        print_json({"ok": True, **asdict(report)})
    else:
        print(f"ok: {report.files} files ({human_bytes(report.bytes)}) match {CHECKSUMS_NAME}")
        print(f"sha256 of {CHECKSUMS_NAME}: {report.checksums_sha256}")
    return 0
