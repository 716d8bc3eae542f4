"""``appliance audit show|verify``: read and check the store's hash-chained audit log."""

from __future__ import annotations

import argparse

from appliance.cli.jsonout import print_json
from appliance.store.location import require_existing_store

DESCRIPTION = """\
The audit log is append-only and hash-chained: every record (imports, refusals, --allow-expired
overrides, trust installs and updates, deletions, quarantines, serve starts, pulls) holds the
hash of the record before it, so editing, removing or reordering one breaks the chain.
"""
SHOW_DESCRIPTION = """\
Print the audit log, oldest first: sequence number, time (UTC), kind and details. --json prints
an array of {seq, time, kind, details, prev, hash} objects. Showing does not check the chain;
run 'appliance audit verify' for that.
"""
SHOW_EPILOG = """\
examples:
  appliance audit show
  appliance audit show --kind override --kind refusal
  appliance audit show --json | jq '.[] | select(.kind == "import")'
"""
VERIFY_DESCRIPTION = """\
Recompute every record's hash and check each holds the hash of the one before. Exit 0 when the
chain is intact; exit 2 (AuditChainError) naming the first record edited, removed or reordered.
"""
VERIFY_EPILOG = """\
example:
  appliance --store /srv/appliance audit verify
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "audit",
        parents=[common],
        help="show and verify the hash-chained audit log",
        description=DESCRIPTION,
        epilog="examples:\n  appliance audit show\n  appliance audit verify\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    show = commands.add_parser(
        "show",
        parents=[common],
        help="print the log, oldest first",
        description=SHOW_DESCRIPTION,
        epilog=SHOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("--json", action="store_true", help="print a JSON array of records")
    show.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="only records of this kind (repeatable): import, refusal, override, trust-install, "
        "trust-update, delete, quarantine, serve-start, pull",
    )
    show.add_argument("--last", type=int, metavar="N", help="only the last N records")
    show.set_defaults(func=run_show)
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="check the hash chain; exit 2 if a record was edited, removed or reordered",
        description=VERIFY_DESCRIPTION,
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.set_defaults(func=run_verify)


def _summary(details: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in details.items() if v is not None)


def run_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from appliance.store import audit
    require_existing_store(args.store)
    records = [r for r in audit.records(args.store) if not args.kind or r.kind in args.kind]
    if args.last is not None:
        records = records[-args.last :] if args.last > 0 else []
    if args.json:
        # Each record as stored: its time is an input of its hash, so it is never rewritten.
        print_json([r.to_json() for r in records])
        return 0
    console = Console()
    if not records:
        console.print("the audit log is empty")
        return 0
    table = Table(title=f"audit log of {args.store}")
    table.add_column("#", justify="right")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("details", overflow="fold")
    for r in records:
        table.add_row(str(r.seq), r.time, r.kind, _summary(r.details))
    console.print(table)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.store import audit
    require_existing_store(args.store)
    count = audit.verify(args.store)
    Console().print(f"audit log intact: {count} record{'s' if count != 1 else ''}, chain verified")
    return 0
