"""The systemd units in packaging/ (issue 21 item 4) are valid and run real commands.

``systemd-analyze verify`` checks them where it is installed (with ExecStart pointed at an
executable that exists here); everywhere, their keys are parsed and checked, and the command
line each one starts is parsed by appliance's own argument parser, so a renamed option fails.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.cli.main import build_parser
from appliance.peer.protocol import DEFAULT_PORT

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNITS = {"appliance-serve.service": "serve", "appliance-peer.service": "peer"}
BINARY = "/usr/local/bin/appliance"
STORE = "/var/lib/appliance"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep or not key.strip().isidentifier():
            raise ValueError(f"line {number}: not 'Key=value' inside a section: {raw!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"[{section}] {key} set {len(values)} times"
    return values[0]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_runs_as_the_appliance_user_restarts_and_is_hardened(name: str) -> None:
    unit = parse_unit((PACKAGING / name).read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Service", "User") == "appliance"
    assert one(unit, "Service", "Environment") == f"APPLIANCE_HOME={STORE}"
    assert one(unit, "Service", "StateDirectory") == Path(STORE).name
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    # Usage errors (1) and refusals (2) do not heal by restarting.
    assert one(unit, "Service", "RestartPreventExitStatus").split() == ["1", "2"]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_command_line_is_one_appliance_accepts(name: str) -> None:
    argv = shlex.split(one(parse_unit((PACKAGING / name).read_text()), "Service", "ExecStart"))
    assert argv[0] == BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == UNITS[name]
    if UNITS[name] == "peer":
        assert args.peer_command == "serve"
        assert args.listen == f"0.0.0.0:{DEFAULT_PORT}"
        assert args.tls_dir == Path("/etc/appliance/tls") and not args.insecure
    else:
        assert args.api_key_file == Path("/etc/appliance/api-keys")
        assert args.max_tokens_default >= 1


def test_parse_unit_refuses_a_line_outside_key_value() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_unit("[Service]\nRestart on-failure\n")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify refuses an ExecStart binary that does not exist; point it at one that does.
    executable = shutil.which("true")
    assert executable
    for name in UNITS:
        text = (PACKAGING / name).read_text().replace(BINARY, executable)
        (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
                          capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any line naming a unit fails.
    complaints = [line for line in proc.stderr.splitlines() if any(n in line for n in UNITS)]
    assert proc.returncode == 0 and complaints == [], proc.stderr
