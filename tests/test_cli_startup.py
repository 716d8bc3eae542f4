"""``appliance --help`` starts fast (issue 22 item 3): building the parser imports none of the
heavy libraries; each command imports what it runs when it runs, and only its own command
group. A module-set check, not a timing one: it holds on a loaded CI machine and names the
culprit when it fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# The console script's path (``entry``): the modules loaded when the command has finished.
_ENTRY_SCRIPT = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules))))
from appliance.cli.main import entry
sys.argv = ["appliance", *{argv!r}]
entry()
"""


def _loaded_by_command(argv: list[str]) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _ENTRY_SCRIPT.format(argv=argv)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


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


def test_help_does_not_load_the_serve_engine_or_cryptography() -> None:
    """--engine's choices are read from appliance.serve.engine only when checked or shown;
    ``Signature`` and key ids (the peer protocol needs them) come without cryptography."""
    loaded = _loaded_by_command(["--help"])
    assert {"appliance.serve.engine", "cryptography", "platformdirs"} & loaded == set()
    assert {"appliance.cli.serve", "appliance.cli.peer"} <= loaded  # every group listed


def test_a_command_loads_only_its_own_group(tmp_path: Path) -> None:
    loaded = _loaded_by_command(["--store", str(tmp_path / "store"), "--debug", "models", "list"])
    assert "appliance.cli.models" in loaded
    assert {m for m in loaded if m.startswith("appliance.cli.")} - {
        "appliance.cli.main", "appliance.cli.options", "appliance.cli.models",
        "appliance.cli.jsonout", "appliance.cli.store"} == set()


# What no run of these commands needs (TUI, inference, web server, BitTorrent, mDNS
# advertisement, certificates, key files, httpx's own command line).
_NOT_FOR_MEDIA = {"textual", "llama_cpp", "starlette", "uvicorn", "libtorrent", "numpy",
                  "gguf", "httpx", "zeroconf", "cryptography.x509", "openai",
                  "cryptography.hazmat.primitives.serialization", "appliance.serve.engine",
                  "appliance.keyfiles"}


@pytest.mark.parametrize("command", ["bundle verify", "import"])
def test_media_commands_load_what_they_check_with_only(tmp_path: Path, command: str) -> None:
    """``bundle verify`` and ``import`` (run as far as the trust root: there is none) load the
    reader and the signature check, and none of the libraries above; verify not the importer,
    and neither draws a progress bar (so imports no rich.progress) without a terminal."""
    media = tmp_path / "media"
    media.mkdir()
    loaded = _loaded_by_command(["--store", str(tmp_path / "store"), *command.split(),
                                 str(media)])
    assert "appliance.bundle.parity_rebuild" in loaded
    assert sorted(_NOT_FOR_MEDIA & loaded) == []
    assert "zfec" not in loaded  # the erasure code only where a volume is rebuilt
    if command == "bundle verify":  # the store's trust state, not its write side
        assert {"appliance.importer", "appliance.store.ingest", "appliance.store.store",
                "rich.progress"} & loaded == set()


def test_peer_pull_loads_httpx_without_its_command_line(tmp_path: Path) -> None:
    """httpx imports click, rich and pygments for its own CLI unless that import fails: the
    console script makes it fail, and the pull (to a port nobody listens on) works without.
    With --no-mdns and --from, zeroconf (and its asyncio) is not loaded either, and a
    plaintext (--insecure) pull loads no X.509 (the site TLS module)."""
    loaded = _loaded_by_command(["--store", str(tmp_path / "store"), "peer", "pull", "--all",
                                 "--from", "http://127.0.0.1:9", "--insecure", "--no-mdns"])
    assert {"httpx", "appliance.peer.pull"} <= loaded
    assert sorted({"click", "pygments", "zeroconf", "textual", "llama_cpp", "starlette", "uvicorn",
                   "libtorrent", "numpy", "gguf", "appliance.serve.engine",
                   "appliance.keyfiles", "appliance.peer.tls", "cryptography.x509"} & loaded) == []


def test_engine_choices_are_the_librarys(capsys: pytest.CaptureFixture[str]) -> None:
    """``--engine`` checks and shows appliance.serve.engine.ENGINES, read when first used."""
    from appliance.cli.main import build_parser
    from appliance.serve.engine import ENGINES

    parser = build_parser("appliance.cli.serve")
    assert parser.parse_args(["serve", "--engine", ENGINES[-1]]).engine == ENGINES[-1]
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--engine", "no-such-engine"])
    assert "invalid choice: 'no-such-engine'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "{" + ",".join(ENGINES) + "}" in capsys.readouterr().out
