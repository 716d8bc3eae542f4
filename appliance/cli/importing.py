"""``appliance import MEDIA_DIR...``: verify a bundle, then import it into the store."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli import jsonout
from appliance.cli.jsonout import print_json
from appliance.cli.options import override_options
from appliance.cli.store import byte_progress
from appliance.errors import MissingVolumeError
from appliance.store.layout import human_bytes

if TYPE_CHECKING:
    from rich.console import Console

    from appliance.format.trust import TrustRoot
    from appliance.importer import ImportResult

DESCRIPTION = """\
Import a signed bundle from removable media into this host's store.

Before a single chunk is read, the bundle is authenticated against the trust root installed in
the store: the carried trust chain is walked (newer roots are then installed), the publisher
signature threshold and key scopes are checked, the bundle's channel sequence must not go
backwards (the same sequence is accepted again only with byte-identical manifest), and an
expired bundle is refused unless --allow-expired --reason TEXT (recorded in the audit log).
A free-space check then says how much room the import needs.

Volumes can be given in any order, all at once or one per run: each run imports what the
volumes given hold and says which volumes are still needed; the next run resumes where the
last one stopped (also after a crash or power loss). Chunks the store already holds (another
version, another quant) are copied locally instead of read from the media. Every chunk is
checked against the signed manifest before it is written, and a model becomes visible only
once all of its files are complete. The media is never modified.

Exit status: 0 when every model of the bundle is in the store; 2 when refused (signature,
trust, rollback, expiry, a corrupt chunk); 3 when volumes are still needed or on I/O errors,
disk full included.
"""

EPILOG = """\
examples:
  appliance import /media/usb0                       # a one-volume bundle
  appliance import /media/usb1/vol-002 /media/usb0/vol-001
  appliance import /media/usb0/vol-001               # later: appliance import .../vol-002
  appliance import /media/usb0 --allow-expired --reason "host clock drifted, ticket 4411"
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "import",
        parents=[common],
        help="verify a bundle on removable media and import it into the store",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "media",
        nargs="+",
        type=Path,
        metavar="MEDIA_DIR",
        help="a volume directory, or a media directory holding vol-NNN volumes",
    )
    parser.add_argument(
        "--allow-expired",
        action="store_true",
        help="accept a bundle past its expiry (needs --reason; audited as an override)",
    )
    parser.add_argument("--reason", metavar="TEXT", help="why the override is justified")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def _summary(console: Console, result: ImportResult) -> None:
    console.print(
        f"bundle {result.channel} #{result.sequence} ({result.manifest_hash[:16]}...), "
        f"signed by {', '.join(result.signers)}",
        highlight=False,
    )
    for ref in result.published:
        console.print(f"[green]imported[/] {ref}", highlight=False)
    for ref in result.present:
        console.print(f"already in the store: {ref}", highlight=False)
    for ref in result.pending:
        console.print(f"[yellow]incomplete[/] {ref}", highlight=False)
    rate = result.media_bytes / result.seconds if result.seconds > 0 else 0.0
    console.print(
        f"{human_bytes(result.media_bytes)} read from media, "
        f"{human_bytes(result.local_bytes)} copied from the store, "
        f"{human_bytes(result.already_done_bytes)} already done; "
        f"{result.seconds:.1f} s ({human_bytes(int(rate))}/s)",
        highlight=False,
    )
    if result.expired_override:
        console.print("[yellow]expired bundle accepted by override (audited)[/]")
    if result.rebuilt:
        console.print(f"rebuilt from parity: {', '.join(result.rebuilt)}", highlight=False)


def result_json(result: ImportResult, roots: list[TrustRoot]) -> dict[str, Any]:
    """The import result in the JSON form every command uses (``ok``, models, signers)."""
    value = asdict(result)
    value.pop("complete")
    return {
        "ok": result.complete,
        **value,
        "signers": jsonout.signers(result.signers, roots),
        "published": [jsonout.model(r) for r in result.published],
        "present": [jsonout.model(r) for r in result.present],
        "pending": [jsonout.model(r) for r in result.pending],
        "seconds": jsonout.seconds(result.seconds),
    }


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.bundle.parity_rebuild import import_media_with_parity
    from appliance.store import trust_state
    allow_expired, reason = override_options(args)
    with byte_progress("importing", enabled=not args.json) as progress:
        result = import_media_with_parity(
            args.store,
            args.media,
            now=datetime.now(UTC),
            allow_expired=allow_expired,
            reason=reason,
            progress=progress,
        )
    if args.json:
        roots = [s.root for s in trust_state.installed_chain(args.store)]
        print_json(result_json(result, roots))
    else:
        _summary(Console(), result)
    if not result.complete:
        raise MissingVolumeError(
            f"the import is not complete: insert {', '.join(result.volumes_needed)} and run "
            "'appliance import' again with it (what was imported so far is kept)"
        )
    return 0
