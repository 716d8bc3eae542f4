"""``appliance doctor [--json]``: show the host checks as a table or JSON; fail on essentials."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from appliance.cli.jsonout import print_json
from appliance.cli.options import LibraryDefault
from appliance.errors import DoctorError, UsageError

if TYPE_CHECKING:
    from appliance.doctor import Check

if TYPE_CHECKING:
    from rich.table import Table

DESCRIPTION = """\
Check that this host can import, store and serve models: Python and library versions, CPU
features (AVX2/FMA/F16C; AMX noted), whether the llama.cpp build is portable, free disk and
a write probe at the store, the installed trust root, and a real load-and-generate from a
tiny model in a child process (so a native crash is reported with its signal, not fatal).

Essential checks decide the exit status: 0 when all pass (warnings allowed), else 3.
"""

EPILOG = """\
examples:
  appliance doctor
  appliance doctor --json | jq '.[] | select(.status != "ok")'
  appliance --store /srv/appliance doctor --timeout 300
"""

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "doctor",
        parents=[common],
        help="check this host: libraries, CPU, llama.cpp, store, trust root",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the checks as a JSON list of {name, status, essential, detail}",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=LibraryDefault("appliance.doctor", "DEFAULT_CHILD_TIMEOUT", shown="{:g}"),
        metavar="SECONDS",
        help="time allowed for the llama.cpp child (default %(default)s)",
    )
    parser.set_defaults(func=run)


def render_table(checks: list[Check]) -> Table:
    from rich.table import Table
    table = Table(title="appliance doctor", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("essential", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in checks:
        style = _STYLE[check.status]
        table.add_row(
            check.name,
            f"[{style}]{check.status}[/]",
            "yes" if check.essential else "no",
            check.detail,
            style=None,
        )
    return table


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from appliance.doctor import failed_essentials, run_checks
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
    err = Console(stderr=True)
    if args.json:
        checks = run_checks(args.store, timeout=args.timeout)
        print_json([c.to_json() for c in checks])
    else:
        with err.status("running checks...") as status:
            checks = run_checks(
                args.store,
                timeout=args.timeout,
                progress=lambda c: status.update(f"checked {c.name}..."),
            )
        Console().print(render_table(checks))
    failed = failed_essentials(checks)
    if failed:
        names = ", ".join(c.name for c in failed)
        raise DoctorError(f"{len(failed)} essential check(s) failed: {names}")
    return 0
