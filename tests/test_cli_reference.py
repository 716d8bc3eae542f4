"""docs/CLI.md's CLI reference is the CLI's own --help, regenerated and compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import reference

CLI_DOC = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"


def test_cli_reference_is_current() -> None:
    text = CLI_DOC.read_text()
    assert reference.embed(text) == text, (
        "docs/CLI.md's CLI reference is stale: run "
        "'.venv/bin/python -m appliance.cli.reference --write docs/CLI.md'"
    )


def test_reference_covers_every_command() -> None:
    text = reference.reference()
    for command in ("bundle build", "bundle verify", "trust init", "import", "peer pull",
                    "serve", "tui", "doctor", "audit verify", "store verify", "models list"):
        assert f"#### `appliance {command}`" in text


def test_embed_refuses_a_document_without_markers() -> None:
    with pytest.raises(SystemExit, match="cli-reference:start"):
        reference.embed("# no markers here\n")
