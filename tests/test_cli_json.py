"""One JSON style across commands (docs/CLI.md, "JSON output"), through the real CLI.

One bundle goes through build, inspect, verify, import, models list/show and trust show;
every ``--json`` answer is checked against the same rules: the success flag is ``ok``,
models are ``{name, version}``, keys (signers) are ``{key_id, name, words}`` objects, times
are RFC 3339 UTC with ``Z``, durations are seconds rounded to 3 decimals, and a narrow
terminal does not wrap the output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import make_sources, write_recipe

from appliance.cli.main import main

Z_TIME = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
KEY_FIELDS = {"key_id", "name", "words"}


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, Any]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return code, json.loads(out)


@pytest.fixture()
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    keys = tmp_path / "keys"
    for name in ("root", "pub-a"):
        assert main(["keys", "generate", name, "--out", str(keys), "--unencrypted"]) == 0
    assert main(["trust", "init", "--root-key", str(keys / "root.pub"), "--root-threshold", "1",
                 "--publisher-key", str(keys / "pub-a.pub"), "--publisher-threshold", "1",
                 "--sign-with", str(keys / "root.key"), "--out",
                 str(tmp_path / "root-1.yaml")]) == 0
    make_sources(tmp_path, random_mib=1)
    write_recipe(tmp_path)
    capsys.readouterr()
    return tmp_path


def assert_signers(signers: list[dict[str, Any]]) -> None:
    assert signers and all(set(s) == KEY_FIELDS for s in signers), signers
    assert [s["name"] for s in signers] == ["pub-a"] and signers[0]["words"]


def assert_seconds(value: float) -> None:
    assert isinstance(value, float) and value == round(value, 3)


def test_one_json_style_from_build_to_models(site: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    store, media, root = site / "store", site / "media", site / "root-1.yaml"
    _, built = run(capsys, "bundle", "build", site / "recipe.yaml", "--key",
                   site / "keys/pub-a.key", "--trust", root, "--out", media, "--json")
    assert built["ok"] is True and built["models"] == [{"name": "acme/tiny",
                                                         "version": "q4_k_m"}]
    assert_signers(built["signers"])
    assert_seconds(built["seconds"])

    _, inspected = run(capsys, "bundle", "inspect", media, "--json")
    assert inspected["ok"] is True and inspected["verified"] is False
    assert_signers(inspected["signers"])
    assert Z_TIME.match(inspected["created"]) and Z_TIME.match(inspected["expires"])

    _, verified = run(capsys, "bundle", "verify", media, "--trust", root, "--json")
    assert verified["ok"] is True and "verified" not in verified
    assert verified["models"] == built["models"]
    assert verified["signers"] == built["signers"] == inspected["signers"]
    assert_seconds(verified["seconds"])

    fingerprint = fingerprint_of(capsys, root)
    assert main(["--store", str(store), "trust", "install", str(root), "--fingerprint",
                 fingerprint]) == 0
    capsys.readouterr()
    _, imported = run(capsys, "--store", store, "import", media, "--json")
    assert imported["ok"] is True and "complete" not in imported
    assert imported["published"] == built["models"] and imported["present"] == []
    assert imported["signers"] == built["signers"]
    assert_seconds(imported["seconds"])

    _, listed = run(capsys, "--store", store, "models", "list", "--json")
    [model] = listed
    assert {"name": model["name"], "version": model["version"]} == built["models"][0]
    assert model["signers"] == built["signers"]
    for field in ("started_at", "imported_at", "verified_at"):
        assert Z_TIME.match(model[field]), (field, model[field])
    assert all(Z_TIME.match(f["verified_at"]) for f in model["files"])

    _, shown = run(capsys, "--store", store, "trust", "show", "--json")
    assert shown["ok"] is True and Z_TIME.match(shown["expires"])
    assert all(set(k) >= KEY_FIELDS for k in shown["keys"])
    assert all(Z_TIME.match(i["installed_at"]) for i in shown["installed"])
    assert all(Z_TIME.match(c["updated_at"]) for c in shown["channels"])

    _, records = run(capsys, "--store", store, "audit", "show", "--json")
    assert records and all(Z_TIME.match(r["time"]) for r in records)

    _, checked = run(capsys, "--store", store, "store", "verify", "--json")
    _, collected = run(capsys, "--store", store, "store", "gc", "--json")
    assert checked["ok"] is True and collected["ok"] is True


def fingerprint_of(capsys: pytest.CaptureFixture[str], root: Path) -> str:
    assert main(["trust", "fingerprint", str(root)]) == 0
    return capsys.readouterr().out.strip()


def test_json_is_never_wrapped_on_a_narrow_terminal(site: Path) -> None:
    # A store path long and full of spaces: rich's console would fold it at 30 columns.
    store = site / ("a store path with many spaces in it, " * 3).strip()
    root = site / "root-1.yaml"
    env = {**os.environ, "COLUMNS": "30", "TERM": "xterm-256color"}

    def appliance(*argv: str | Path) -> str:
        done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "--store",
                               str(store), *map(str, argv)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    fingerprint = appliance("trust", "fingerprint", root).strip()
    appliance("trust", "install", root, "--fingerprint", fingerprint)
    shown = appliance("trust", "show", "--json")
    assert json.loads(shown)["source"] == f"store {store}"
    assert all(len(line) > 30 for line in shown.splitlines() if "source" in line)


def test_every_command_prints_json_through_print_json() -> None:
    """One printer: json.dumps straight to stdout (rich would wrap and re-style it)."""
    cli = Path(__file__).resolve().parent.parent / "appliance" / "cli"
    offenders = [f"{path.name}:{n}" for path in sorted(cli.glob("*.py"))
                 if path.name != "jsonout.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bjson\.dumps?\(", line)]
    assert offenders == []
