"""README's CLI reference is the CLI's own --help, regenerated and compared."""

from __future__ import annotations

from pathlib import Path

from appliance.cli import reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_cli_reference_is_current() -> None:
    text = README.read_text()
    assert reference.embed(text) == text, (
        "README.md's CLI reference is stale: run "
        "'.venv/bin/python -m appliance.cli.reference --write README.md'"
    )


def test_reference_covers_every_command() -> None:
    text = reference.reference()
    for command in ("bundle build", "bundle verify", "trust init", "import", "peer pull",
                    "serve", "tui", "doctor", "audit verify", "store verify", "models list"):
        assert f"#### `appliance {command}`" in text
