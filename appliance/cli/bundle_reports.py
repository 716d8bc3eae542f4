"""``appliance bundle sbom|sheet``: documents about a bundle for other tools and for people.

Thin shells over ``appliance.bundle.sbom`` (CycloneDX 1.6 ML-BOM) and
``appliance.bundle.sheet`` (the approver's one-page sheet). Both read the media like
``bundle inspect``: unverified unless ``--trust ROOT`` is given, and both say which.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import fsutil
from appliance.errors import MediaError, UsageError

if TYPE_CHECKING:
    from appliance.bundle.reader import Media
    from appliance.format.manifest import Manifest

AddParser = Callable[[str, str, str, str], argparse.ArgumentParser]

SBOM_DESCRIPTION = """\
Write a CycloneDX 1.6 ML-BOM of a bundle: each model as a machine-learning-model component
(licence, GGUF facts as appliance:gguf:* properties), each file with its SHA-256 (from the
signed provenance) and Merkle root, the bundle's signers as authors. Unverified unless --trust
is given; the BOM says which (property appliance:verified).
"""
SBOM_EPILOG = """\
examples:
  appliance bundle sbom /media/usb0/appliance --trust keys/roots/root-1.yaml -o bundle.cdx.json
  appliance bundle inspect /media/usb0/appliance --sbom
"""
SHEET_DESCRIPTION = """\
Write a one-page approval sheet (Markdown, or HTML with --html) for the site's approver: the
models with sizes and licences, the signers by name and key id, and the manifest digest as
words to read back to the publisher out of band.
"""
SHEET_EPILOG = """\
example:
  appliance bundle sheet /media/usb0/appliance --trust keys/roots/root-1.yaml -o sheet.md
"""


def register(add: AddParser) -> None:
    sbom = add("sbom", "write a CycloneDX ML-BOM of a bundle", SBOM_DESCRIPTION, SBOM_EPILOG)
    sbom.add_argument("media", nargs="+", type=Path, metavar="MEDIA_DIR")
    sbom.add_argument("--trust", type=Path, metavar="ROOT",
                      help="verify signatures against this root file first")
    sbom.add_argument("-o", "--output", type=Path, metavar="FILE",
                      help="write to FILE (default: stdout)")
    sbom.set_defaults(func=run_sbom)

    sheet = add("sheet", "write an approval sheet for a bundle", SHEET_DESCRIPTION,
                SHEET_EPILOG)
    sheet.add_argument("media", nargs="+", type=Path, metavar="MEDIA_DIR")
    sheet.add_argument("--trust", type=Path, metavar="ROOT",
                       help="verify signatures against this root file first")
    sheet.add_argument("--html", action="store_true", help="HTML instead of Markdown")
    sheet.add_argument("-o", "--output", type=Path, metavar="FILE",
                       help="write to FILE (default: stdout)")
    sheet.set_defaults(func=run_sheet)


def read_bundle(paths: Sequence[Path], trust: Path | None) -> tuple[Media, Manifest, bool]:
    """The media and its manifest: authenticated against ``trust`` when given."""
    from appliance.bundle.reader import open_media
    from appliance.format.trust import verify_self_signed
    from appliance.store import trust_state
    media = open_media(paths)
    if trust is None:
        return media, media.parse_unverified(), False
    now = datetime.now(UTC)
    root = verify_self_signed(trust_state.read_root_file(trust), now)
    return media, media.authenticate(root, now).manifest, True


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        fsutil.write_atomic(output, text.encode())
    except OSError as e:
        raise MediaError(f"cannot write {output}: {e}") from e


def print_sbom(media: Media, manifest: Manifest, verified: bool) -> int:
    """``bundle inspect --sbom``: the BOM on stdout."""
    from appliance.bundle.sbom import bundle_sbom
    _emit(bundle_sbom(media, manifest, verified=verified), None)
    return 0


def oms_signatures(values: Sequence[str]) -> dict[str, Path]:
    """``bundle build --oms-signature NAME=FILE`` values as model name -> file."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise UsageError(f"--oms-signature wants NAME=FILE, got {value!r}")
        if name in out:
            raise UsageError(f"--oms-signature for {name} given twice")
        out[name] = Path(file)
    return out


def run_sbom(args: argparse.Namespace) -> int:
    from appliance.bundle.sbom import bundle_sbom
    media, manifest, verified = read_bundle(args.media, args.trust)
    _emit(bundle_sbom(media, manifest, verified=verified), args.output)
    return 0


def run_sheet(args: argparse.Namespace) -> int:
    from appliance.bundle.sheet import approval_sheet, sheet_html
    media, manifest, verified = read_bundle(args.media, args.trust)
    text = approval_sheet(media, manifest, verified=verified)
    if args.html:
        text = sheet_html(text, f"Approval sheet: {manifest.channel} #{manifest.sequence}")
    _emit(text, args.output)
    return 0
