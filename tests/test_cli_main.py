"""The CLI shell: --version, --help teaches exit codes, errors map to codes in one line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from appliance import __version__
from appliance.cli import main as cli
from appliance.errors import ExpiredError, StoreError, UsageError


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for line in ("0  ok", "1  usage", "2  refused", "3  any other error"):
        assert line in out


def test_unknown_command_is_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 1


def test_no_command_prints_help_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 1
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "code"),
    [(UsageError("bad"), 1), (ExpiredError("old"), 2), (StoreError("disk"), 3),
     (RuntimeError("bug"), 3)],
)
def test_errors_map_to_exit_codes_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception, code: int
) -> None:
    def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
        def boom(args: argparse.Namespace) -> int:
            raise error

        sub.add_parser("boom", parents=[common]).set_defaults(func=boom)

    real_import = cli.importlib.import_module
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("fake",))
    monkeypatch.setattr(
        cli.importlib, "import_module",
        lambda name: argparse.Namespace(register=register) if name == "fake" else real_import(name),
    )
    assert cli.main(["boom"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert cli.main(["boom", "--debug"]) == code
    assert "Traceback" in capsys.readouterr().err


def test_store_option_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Path] = []

    def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
        sub.add_parser("where", parents=[common]).set_defaults(
            func=lambda a: seen.append(a.store) or 0
        )

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("fake",))
    real_import = cli.importlib.import_module
    monkeypatch.setattr(
        cli.importlib, "import_module",
        lambda name: argparse.Namespace(register=register) if name == "fake" else real_import(name),
    )
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "env"))
    cli.main(["where"])
    cli.main(["--store", str(tmp_path / "a"), "where"])
    cli.main(["where", "--store", str(tmp_path / "b")])
    assert seen == [tmp_path / "env", tmp_path / "a", tmp_path / "b"]
