"""A whole site: one host imports a real bundle from media, three others get it from the LAN.

Four hosts on a test-made network (namespaces on a bridge; loopback ports when namespaces
cannot be made), all with site certificates and mutual TLS. Host 0 imports the bundle with
``appliance import`` and serves it. Host 1 imported it too but lies: every chunk it sends has
a flipped byte. Host 2 pulls from the liar and host 0; host 3 pulls from the liar and host 2
(a host that itself only pulled). Every host ends with the model verified and servable, byte
for byte the source file, and an intact audit log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_helpers import build, make_sources, write_recipe
from peer_helpers import stop
from trust_helpers import NOW, make_root

from appliance.cli.main import main
from appliance.peer import tls
from appliance.store import audit, trust_state
from appliance.store.records import get_model
from appliance.testlan import Lan, Loopback, make_lan

REPO = Path(__file__).resolve().parent.parent
PORT = 8765


@pytest.fixture
def lan() -> Iterator[Lan]:
    with make_lan(4) as made:
        yield made



def url(lan: Lan, host: int) -> str:
    # Loopback hosts share one address, so each listens on its own port.
    port = PORT + host if isinstance(lan, Loopback) else PORT
    return f"https://{lan.addresses[host]}:{port}"


def run_site(lan: Lan, tmp_path: Path, gguf: Path) -> None:
    signed = make_root()
    base = tmp_path / "build"
    base.mkdir()
    make_sources(base, gguf, random_mib=1)
    recipe = write_recipe(base, files=("tiny.gguf",), name="acme/tiny")
    media = build(base, recipe=recipe, root=signed).out_dir
    tls.init_site(tmp_path / "ca")
    stores, tls_dirs = [], []
    for i in range(4):
        tls_dirs.append(tls.enroll_host(f"host{i}", tmp_path / "ca", tmp_path / f"tls{i}",
                                        ips=[lan.addresses[i]]).directory)
        store = tmp_path / f"store{i}"
        trust_state.install_first_root(store, signed.to_bytes(), signed.root.fingerprint, NOW)
        stores.append(store)
    for i in (0, 1):
        assert main(["--store", str(stores[i]), "import", str(media)]) == 0
    procs: list[subprocess.Popen[str]] = []
    try:
        def serve(i: int) -> None:
            port = url(lan, i).rsplit(":", 1)[1]
            procs.append(lan.serve(i, "--store", str(stores[i]), "peer", "serve", "--tls-dir",
                                   str(tls_dirs[i]), "--listen", f"0.0.0.0:{port}",
                                   "--no-advertise"))
            assert procs[-1].stdout is not None
            assert "serving" in procs[-1].stdout.readline()

        serve(0)
        liar_port = url(lan, 1).rsplit(":", 1)[1]
        procs.append(lan.spawn(1, [sys.executable, str(REPO / "tests" / "lying_peer.py"),
                                   str(stores[1]), "0.0.0.0", liar_port, str(tls_dirs[1])]))
        assert procs[-1].stdout is not None
        assert "lying" in procs[-1].stdout.readline()

        def pull(i: int, *sources: int) -> str:
            froms = [arg for s in sources for arg in ("--from", url(lan, s))]
            done = lan.run(i, "--store", str(stores[i]), "peer", "pull", "acme/tiny",
                           "--tls-dir", str(tls_dirs[i]), *froms)
            assert done.returncode == 0, done.stderr
            return done.stdout

        out2 = pull(2, 1, 0)
        assert f"dropped {url(lan, 1)}" in out2 and "IntegrityError" in out2
        serve(2)
        out3 = pull(3, 1, 2)
        assert f"{url(lan, 2)}:" in out3
    finally:
        for proc in procs:
            stop(proc)
    source = gguf.read_bytes()
    for i in (0, 2, 3):
        model = get_model(stores[i], "acme/tiny")  # verified, published, servable
        assert model.path.read_bytes() == source
        assert audit.verify(stores[i]) > 0
        listed = subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", "--store", str(stores[i]), "models",
             "list", "--json"], capture_output=True, text=True, cwd=REPO, check=True)
        [entry] = json.loads(listed.stdout)
        assert entry["verified"] is True
    kinds = [r.kind for r in audit.records(stores[3])]
    assert "pull" in kinds


@pytest.mark.slow
def test_one_import_seeds_the_site_through_a_lying_peer(lan: Lan, tmp_path: Path,
                                                        tiny_gguf: Path) -> None:
    run_site(lan, tmp_path, tiny_gguf)


@pytest.mark.slow
def test_gemma_seeds_the_site(lan: Lan, tmp_path: Path, gemma_gguf: Path) -> None:
    run_site(lan, tmp_path, gemma_gguf)
