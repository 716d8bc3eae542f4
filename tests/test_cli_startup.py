"""``appliance --help`` starts fast (issue 22 item 3): building the parser imports none of the
heavy libraries; each command imports what it runs when it runs. A module-set check, not a
timing one: it holds on a loaded CI machine and names the culprit when it fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("llama_cpp", "textual", "numpy", "gguf", "httpx", "zeroconf", "starlette", "uvicorn",
         "libtorrent", "rich", "yaml", "zstandard", "zfec", "cyclonedx", "openai")

_SCRIPT = """
import contextlib, io, json, sys
from appliance.cli.main import build_parser, main
build_parser()
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main({argv!r})
    except SystemExit:
        pass
print(json.dumps({{"modules": sorted(sys.modules), "help": out.getvalue()}}))
"""


def _loaded(argv: list[str]) -> tuple[set[str], str]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(argv=argv)], check=True,
                         capture_output=True, text=True, timeout=120)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    return {m.split(".")[0] for m in facts["modules"]}, facts["help"]


def test_help_imports_no_heavy_module() -> None:
    loaded, text = _loaded(["--help"])
    assert "usage: appliance" in text and "serve" in text and "peer" in text
    assert sorted(set(HEAVY) & loaded) == []


@pytest.mark.parametrize("argv", [["peer", "pull", "--help"], ["torrent", "fetch", "--help"],
                                  ["doctor", "--help"]])
def test_a_commands_help_shows_defaults_read_from_the_library(argv: list[str]) -> None:
    """Defaults that live in heavy modules (LibraryDefault) are read for the command's own
    --help and after parsing, and show the library's value."""
    _, text = _loaded(argv)
    from appliance.doctor import DEFAULT_CHILD_TIMEOUT
    from appliance.peer.pull import PullOptions
    from appliance.torrent.fetch import FetchOptions

    expected = {
        "peer": f"(default: {PullOptions.per_peer})",
        "torrent": f"(default: {FetchOptions.wait_for_pieces})",
        "doctor": f"(default {DEFAULT_CHILD_TIMEOUT:g})",
    }[argv[0]]
    assert expected in " ".join(text.split())


def test_parsed_arguments_hold_the_librarys_values_not_placeholders() -> None:
    from appliance.cli.main import build_parser
    from appliance.cli.options import LibraryDefault
    from appliance.peer.client import Timeouts
    from appliance.peer.pull import PullOptions
    from appliance.torrent.session import DEFAULT_PORT

    pull = build_parser().parse_args(["peer", "pull", "--all"])
    assert (pull.per_peer, pull.timeout) == (PullOptions.per_peer, Timeouts.read)
    seed = build_parser().parse_args(["torrent", "seed"])
    assert seed.listen == f"0.0.0.0:{DEFAULT_PORT}"
    for args in (pull, seed):
        assert not any(isinstance(v, LibraryDefault) for v in vars(args).values())
