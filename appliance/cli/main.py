"""The ``appliance`` command: parse arguments, call the library, map errors to exit codes.

Each command group lives in its own module in this package and exposes
``register(subparsers, common)``; handlers take the parsed ``argparse.Namespace`` and return
an exit code. No command prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from appliance import __version__
from appliance.cli.options import resolve_defaults
from appliance.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ApplianceError
from appliance.paths import STORE_ENV, default_store

# Command groups, in the order --help lists them. Each module defines register() and imports
# what its commands run inside them: building the parser (``appliance --help``) must not load
# llama.cpp, Textual, httpx, libtorrent or the web stack (tests/test_cli_startup.py).
COMMAND_MODULES = (
    "appliance.cli.keys",
    "appliance.cli.trust",
    "appliance.cli.bundle",
    "appliance.cli.importing",
    "appliance.cli.models",
    "appliance.cli.store",
    "appliance.cli.audit",
    "appliance.cli.doctor",
    "appliance.cli.serve",
    "appliance.cli.receipt",
    "appliance.cli.peer",
    "appliance.cli.torrent",
    "appliance.cli.oci",
    "appliance.cli.site",
    "appliance.cli.tui",
    "appliance.cli.iso",
)

# The command each module registers, where it is not the module's own name.
_COMMAND_OF_MODULE = {"appliance.cli.importing": "import"}
# Options the top-level parser accepts before a command (see ``_common_options``).
_LEADING_FLAGS = ("--debug",)
_LEADING_VALUED = ("--store",)


def _command_module(name: str) -> str:
    return _COMMAND_OF_MODULE.get(name, name.rsplit(".", 1)[-1])


def _only_module(argv: Sequence[str]) -> str | None:
    """The one command module that ``argv`` runs, when nothing else can be needed: the first
    word after the common options names a command. Anything else before it (``--help``,
    ``--version``, an unknown option) or no command at all needs the whole parser, as its
    output lists every command."""
    tokens = iter(argv)
    for token in tokens:
        if token in _LEADING_VALUED:
            next(tokens, None)
        elif token in _LEADING_FLAGS or token.startswith(tuple(f"{o}=" for o in _LEADING_VALUED)):
            continue
        elif token.startswith("-"):
            return None
        else:
            return next((m for m in COMMAND_MODULES if _command_module(m) == token), None)
    return None


EPILOG = f"""\
exit codes:
  0  ok
  1  usage error: bad arguments, or something needed is not there yet (a file named on the
     command line, the store, the trust root); the message says what to do first
  2  refused: integrity, signature, trust, rollback or expiry check failed
  3  any other error (I/O, disk full, peer unreachable, ...)

The store is --store DIR, else ${STORE_ENV}, else the platform data dir
(~/.local/share/appliance on Linux).
Run 'appliance COMMAND --help' for each command's options and examples.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that exits with our usage code (1) instead of its own 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        return resolve_defaults(parsed), rest


def _common_options() -> argparse.ArgumentParser:
    """Options accepted both before and after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"store directory (default: ${STORE_ENV}, else the platform data dir)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print tracebacks on errors",
    )
    return common


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` the parser of that one command module (a command
    imports and builds just its own group: a tenth of a second less at every start)."""
    common = _common_options()
    parser = _Parser(
        prog="appliance",
        description=(
            "Air-gapped model provisioning: build signed GGUF bundles on removable media, "
            "verify and import them into a local store, share them between LAN peers, and "
            "serve them with llama.cpp through an OpenAI-compatible API."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES if only is None else (only,):
        importlib.import_module(name).register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_only_module(argv))
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    args.store = Path(getattr(args, "store", None) or default_store())
    handler = getattr(args, "func", None)
    if handler is None:
        build_parser().print_help()  # every command, not just the group parsed
        return EXIT_USAGE
    try:
        return int(handler(args) or EXIT_OK)
    except ApplianceError as e:
        if args.debug:
            traceback.print_exc()
        print(f"appliance: {type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(
            f"appliance: internal error: {type(e).__name__}: {e} "
            "(run with --debug for a traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _skip_httpx_cli() -> None:
    """httpx imports its own command-line client (click, rich, pygments: a third of a peer
    pull's start-up) unless that import fails, when it installs a stub ``main``. This
    process never runs httpx's CLI, so the import is made to fail (``None`` in
    ``sys.modules``) before anything imports httpx."""
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def entry() -> None:
    _skip_httpx_cli()
    sys.exit(main())


if __name__ == "__main__":
    entry()
