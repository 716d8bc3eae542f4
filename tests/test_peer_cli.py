"""``appliance peer serve|list|pull`` end to end: a real server process, the CLI as users run it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_helpers import CHUNK, Bundle, make_bundle, model_bytes
from peer_helpers import published_bytes, seed
from trust_helpers import trusted_store

from appliance.cli.main import main
from appliance.peer import tls
from appliance.store import trust_state

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_manifest() -> Bundle:
    return make_bundle({"tiny": {"model.gguf": model_bytes(21, 6 * CHUNK)}})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("site")
    tls.init_site(base / "ca")
    for host in ("a", "b"):
        tls.enroll_host(f"host-{host}", base / "ca", base / host)
    return base


class ServeProcess:
    """``appliance peer serve`` in a child process; the URL comes from its first line."""

    def __init__(self, store: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "--store", str(store), "peer", "serve",
             "--listen", "127.0.0.1:0", "--no-advertise", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"on (https?://127\.0\.0\.1:\d+)", line)
        if not found:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"no URL in {line!r}: {err}")
        self.url = found.group(1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def served(tmp_path: Path, tiny_manifest: Bundle) -> Iterator[ServeProcess]:
    store = trusted_store(tmp_path / "a")
    seed(store, tiny_manifest)
    server = ServeProcess(store, "--insecure")
    yield server
    server.stop()


def test_serve_pull_and_list_plaintext(tmp_path: Path, tiny_manifest: Bundle, served: ServeProcess,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    b = trusted_store(tmp_path / "b")
    assert main(["--store", str(b), "peer", "pull", "tiny", "--from", served.url,
                 "--insecure"]) == 0
    out = capsys.readouterr().out
    assert "pulled tiny:1" in out and served.url in out
    assert published_bytes(b, "tiny", "model.gguf") == tiny_manifest.contents["tiny"]["model.gguf"]
    (b / "site.yaml").write_text(f"peers:\n  - {served.url}\n")
    assert main(["--store", str(b), "peer", "list", "--no-mdns", "--insecure", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["source"] == "static" and entry["manifests"][0]["hash"] == tiny_manifest.hash
    assert main(["--store", str(b), "peer", "list", "--no-mdns", "--insecure"]) == 0
    assert "main #1: tiny:1" in capsys.readouterr().out
    assert served.stop() == 0  # SIGTERM ends the server cleanly


def test_serve_and_pull_over_mutual_tls(tmp_path: Path, tiny_manifest: Bundle, site: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    a = trusted_store(tmp_path / "a")
    seed(a, tiny_manifest)
    server = ServeProcess(a, "--tls-dir", str(site / "a"))
    try:
        assert server.url.startswith("https://")
        b = trusted_store(tmp_path / "b")
        # The TLS directory found at $STORE/tls without any flag.
        (b / "tls").symlink_to(site / "b")
        assert main(["--store", str(b), "peer", "pull", "--all", "--from", server.url]) == 0
        assert "pulled tiny:1" in capsys.readouterr().out
        # Plaintext is refused unless asked for.
        assert main(["--store", str(b), "peer", "pull", "tiny", "--from",
                     server.url.replace("https", "http")]) == 1
        assert "insecure" in capsys.readouterr().err
    finally:
        assert server.stop() == 0


def test_refusals_exit_2_and_usage_errors_exit_1(tmp_path: Path, served: ServeProcess,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    b = trusted_store(tmp_path / "b")
    trust_state.record_channel(b, "main", 7, "e" * 64)
    assert main(["--store", str(b), "peer", "pull", "tiny", "--from", served.url,
                 "--insecure"]) == 2
    assert "RollbackError" in capsys.readouterr().err
    assert main(["--store", str(b), "peer", "pull", "--from", served.url, "--insecure"]) == 1
    assert main(["--store", str(b), "peer", "pull", "tiny", "--all", "--insecure",
                 "--from", served.url]) == 1
    assert main(["--store", str(b), "peer", "pull", "tiny", "--from", served.url]) == 1
    assert "--tls-dir" in capsys.readouterr().err
    assert main(["--store", str(b), "peer", "serve", "--no-advertise"]) == 1
    with pytest.raises(SystemExit) as info:
        main(["--store", str(b), "peer", "serve", "--insecure", "--tls-dir", "x"])
    assert info.value.code == 1
    assert main(["--store", str(b), "peer", "pull", "tiny", "--insecure", "--no-mdns"]) == 3
    assert "no peers" in capsys.readouterr().err
    (b / "site.yaml").write_text("peers: [1, 2]\n")
    assert main(["--store", str(b), "peer", "list", "--insecure", "--no-mdns"]) == 1


def test_help_texts_teach(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["peer", "--help"], ["peer", "serve", "--help"], ["peer", "pull", "--help"],
                 ["peer", "list", "--help"], ["site", "init", "--help"],
                 ["site", "enroll", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and "appliance " in out.split("example", 1)[1]
