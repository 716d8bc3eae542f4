"""The CLI reference in Markdown, generated from the parsers' own --help.

``python -m appliance.cli.reference`` prints it; docs/CLI.md embeds it between the markers
``<!-- cli-reference:start -->`` and ``<!-- cli-reference:end -->``, and
tests/test_cli_reference.py keeps the two identical (``--write docs/CLI.md`` refreshes it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from appliance.cli.main import build_parser

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
WIDTH = "100"


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str]]:
    yield path, parser.format_help()
    for name, sub in _subparsers(parser):
        yield from _walk(sub, f"{path} {name}")


def reference() -> str:
    """Every command's --help, formatted at a fixed width so the text is machine-independent."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parts = [START, ""]
        for path, text in _walk(build_parser(), "appliance"):
            parts += [f"#### `{path}`", "", "```text", text.rstrip(), "```", ""]
        parts.append(END)
        return "\n".join(parts)
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def embed(document: str) -> str:
    """``document`` (docs/CLI.md's text) with the reference between the markers made fresh."""
    head, sep, rest = document.partition(START)
    if not sep or END not in rest:
        raise SystemExit(f"the document has no {START} ... {END} section")
    tail = rest.split(END, 1)[1]
    return head + reference() + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.cli.reference",
                                     description=__doc__)
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="refresh the section in this file (docs/CLI.md) instead of printing")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(embed(args.write.read_text()))
    else:
        sys.stdout.write(reference() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
