"""The real ``appliance tui`` in a real terminal: tmux runs it, the test types keys and
reads the screen with capture-pane. Catches what Pilot cannot: the console entry point,
argument parsing, terminal setup, and that the app quits cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from trust_helpers import make_root, trusted_store
from tui_helpers import build_gguf_media

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """One private tmux server (its own socket) holding one session."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                                text=True, timeout=30, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "tui")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "tui", *keys)

    def wait_for(self, *texts: str, timeout: float = 30.0) -> str:
        """The screen once every text is on it (Textual draws in several passes)."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if all(t in screen for t in texts):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{texts!r} never appeared; the screen was:\n{screen}")


@pytest.fixture()
def tmux() -> Iterator[Tmux]:
    t = Tmux(f"appliance-test-{os.getpid()}")
    try:
        yield t
    finally:
        t.run("kill-server", check=False)


def test_real_tui_in_tmux(tmp_path: Path, tiny_gguf: Path, tmux: Tmux) -> None:
    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    exe = Path(sys.executable).parent / "appliance"
    command = (f"{exe} tui --store {store} --media {media} --no-scan --no-mdns; "
               f"echo exit=$? > {tmp_path / 'exit'}")
    tmux.run("new-session", "-d", "-s", "tui", "-x", "100", "-y", "30", command)

    tmux.wait_for("1 bundle(s) found", "site-models #1", "1 Media", "8 Audit", "palette")
    tmux.keys("Enter")
    tmux.wait_for("signed by p1", "acme/tiny", "Verify")
    tmux.keys("v")
    tmux.wait_for("verified: ")
    tmux.keys("7")
    tmux.wait_for("trust root v1", make_root().root.fingerprint)
    tmux.keys("q")
    deadline = time.monotonic() + 20
    while not (tmp_path / "exit").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "exit").read_text().strip() == "exit=0"
