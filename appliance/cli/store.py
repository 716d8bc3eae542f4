"""``appliance store verify|gc``: re-hash the store (quarantining bad files) and clean it up.

Also holds ``byte_progress``, the rich progress bar (throughput, ETA) the import, verify and
peer pull commands share: the library reports ``(done, total)`` bytes through a callback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from appliance.cli import jsonout
from appliance.cli.jsonout import print_json
from appliance.errors import EXIT_REFUSED
from appliance.store.layout import human_bytes
from appliance.store.location import require_existing_store

if TYPE_CHECKING:
    from rich.console import Console

VERIFY_DESCRIPTION = """\
Re-hash every published model file against the chunk list of the signed manifest it came from.
A file that differs (flipped bits, truncation, a missing file) is MOVED to the store's
quarantine/ directory, never deleted; its model is then listed as not verified and is never
served; the audit log gets a "quarantine" record. Importing the same bundle again re-fetches
it. Exit 0 when every file is intact, 2 when any was quarantined.
"""
VERIFY_EPILOG = """\
examples:
  appliance store verify
  appliance --store /srv/appliance store verify --json
"""
GC_DESCRIPTION = """\
Delete what the index does not account for: staged files of no import, files under models/
that no published model owns (a crash during 'models rm'), empty directories, and what
torrent commands left under torrent-scratch/ (a killed fetch's links and kept chunk copies, a
stopped partial seed's links): a directory a running torrent command holds is never removed.
Imports that stopped part-way are kept so they can resume; --abandon drops them too. The
quarantine/ directory is never touched (delete evidence by hand once examined).
"""
GC_EPILOG = """\
examples:
  appliance store gc
  appliance store gc --abandon     # also drop unfinished imports
"""


@contextmanager
def byte_progress(
    description: str,
    *,
    enabled: bool = True,
    transient: bool = False,
    console: Console | None = None,
) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar with throughput and ETA on stderr.

    Pass the ``console`` other messages go to while the bar runs, so they print above it;
    ``transient`` removes the bar when done. When the work fails the bar is always removed:
    the error line that follows says what happened, a half-full bar above it would not.
    """
    if not enabled:  # no terminal to draw on: rich is not even imported
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=transient,
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    progress.start()
    try:
        yield update
    except BaseException:
        # Progress.stop() would also print a newline on a non-terminal: stop the live view
        # itself, transient, so nothing of the bar is left above the error line.
        progress.live.transient = True
        progress.live.stop()
        raise
    progress.stop()


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "store",
        parents=[common],
        help="verify every stored byte, clean up leftovers",
        description="Upkeep of the local store (see also 'appliance models').",
        epilog="examples:\n  appliance store verify\n  appliance store gc\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="re-hash every model file; quarantine the corrupt ones",
        description=VERIFY_DESCRIPTION,
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=run_verify)
    collect = commands.add_parser(
        "gc",
        parents=[common],
        help="delete leftovers the index does not account for",
        description=GC_DESCRIPTION,
        epilog=GC_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    collect.add_argument(
        "--abandon", action="store_true", help="also drop imports that stopped part-way"
    )
    collect.add_argument("--json", action="store_true", help="print the report as JSON")
    collect.set_defaults(func=run_gc)


def run_verify(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.store.scrub import verify_store
    require_existing_store(args.store)
    with byte_progress("verifying", enabled=not args.json) as progress:
        report = verify_store(args.store, progress=progress)
    if args.json:
        print_json(
            {
                "ok": report.ok,
                "files_checked": report.files_checked,
                "bytes_checked": report.bytes_checked,
                "corrupt": [
                    {
                        "name": c.model,
                        "version": c.version,
                        "path": c.path,
                        "reason": c.reason,
                        "chunk": c.chunk,
                        "offset": c.offset,
                        "quarantined_to": str(c.quarantined_to) if c.quarantined_to else None,
                    }
                    for c in report.corrupt
                ],
            }
        )
        return 0 if report.ok else EXIT_REFUSED
    console = Console()
    for c in report.corrupt:
        where = f"moved to {c.quarantined_to}" if c.quarantined_to else "nothing to move"
        console.print(
            f"[bold red]CORRUPT[/] {c.model}:{c.version}/{c.path}: {c.reason}; {where}",
            highlight=False,
        )
    summary = (
        f"{report.files_checked} files, {human_bytes(report.bytes_checked)} checked; "
        f"{len(report.corrupt)} quarantined"
    )
    console.print(("[green]ok[/] " if report.ok else "[bold red]FAILED[/] ") + summary)
    return 0 if report.ok else EXIT_REFUSED


def run_gc(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.store.scrub import gc
    require_existing_store(args.store)
    report = gc(args.store, abandon=args.abandon)
    if args.json:
        print_json(
            {
                "ok": True,
                "removed": [str(p) for p in report.removed],
                "freed_bytes": report.freed_bytes,
                "abandoned": [jsonout.model(r) for r in report.abandoned],
                "pending": [jsonout.model(r) for r in report.pending],
            }
        )
        return 0
    console = Console()
    for path in report.removed:
        console.print(f"removed {path}", highlight=False)
    for ref in report.abandoned:
        console.print(f"abandoned the unfinished import of {ref}")
    for ref in report.pending:
        console.print(f"kept the unfinished import of {ref} (resume it, or gc --abandon)")
    console.print(f"freed {human_bytes(report.freed_bytes)}")
    return 0
