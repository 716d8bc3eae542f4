"""scripts/setup.sh announces the llama.cpp build only when pip will compile (issue 21 item 3).

``llama_build_plan`` is run straight from the script, with ``PY`` pointing at a stand-in
interpreter that answers the three questions it asks: can it import llama_cpp, which version
would pip pick, which wheels does pip's cache hold.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup.sh"
STAND_IN = """#!/bin/sh
case "$*" in
  "-c import llama_cpp") [ -n "$IMPORTABLE" ] ;;
  "-m pip index versions llama-cpp-python") echo "llama-cpp-python ($INDEX_VERSION)" ;;
  "-m pip cache list llama_cpp_python --format=abspath")
    [ -z "$CACHED_VERSION" ] ||
      echo "/cache/wheels/ab/llama_cpp_python-$CACHED_VERSION-py3-none-linux_x86_64.whl" ;;
  *) exit 99 ;;
esac
"""


def plan(python: str, **env: str) -> str:
    script = SETUP.read_text()
    start = script.index("llama_build_plan() {")
    function = script[start:script.index("\n}\n", start) + 3]
    proc = subprocess.run(["bash", "-c", f"{function}\nllama_build_plan"],
                          env={"PATH": "/usr/bin:/bin", "PY": python, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip()


@pytest.fixture()
def stand_in(tmp_path: Path) -> str:
    path = tmp_path / "python"
    path.write_text(STAND_IN)
    path.chmod(0o755)
    return str(path)


def test_installed_llama_cpp_is_not_built_again() -> None:
    pytest.importorskip("llama_cpp")
    assert plan(sys.executable) == "installed"


def test_a_cached_wheel_of_the_version_pip_picks_is_not_built(stand_in: str) -> None:
    assert plan(stand_in, INDEX_VERSION="0.3.36", CACHED_VERSION="0.3.36") == "cached"


def test_a_cached_wheel_of_an_older_version_means_a_build(stand_in: str) -> None:
    assert plan(stand_in, INDEX_VERSION="0.3.37", CACHED_VERSION="0.3.36") == "build"


def test_nothing_cached_means_a_build(stand_in: str) -> None:
    assert plan(stand_in, INDEX_VERSION="0.3.36", CACHED_VERSION="") == "build"


def test_an_unreachable_index_announces_the_build(stand_in: str) -> None:
    assert plan(stand_in, INDEX_VERSION="", CACHED_VERSION="0.3.36") == "build"
