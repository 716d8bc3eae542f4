"""House rules a newcomer relies on (issue 13): what is tracked, and how bench/ reaches helpers."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_build_outputs_are_not_tracked() -> None:
    """appliance.egg-info (pip's build output) was committed once and went stale."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--", "*.egg-info/*", "build", "dist"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert tracked == ""


def test_bench_imports_helpers_without_editing_sys_path() -> None:
    """bench/ imports what it shares with the tests from the package (appliance.tiny_model,
    appliance.testlan), never by putting tests/ on sys.path."""
    edits = []
    for module in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(
                    node.value, ast.Name) and node.value.id == "sys":
                edits.append(f"{module.name}:{node.lineno}")
    assert edits == []
