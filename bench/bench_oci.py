"""OCI push and pull through a local CNCF Distribution registry against ``skopeo copy``.

Setup: a bundle (gemma3-270m when installed, else generated weights) built and imported into
a seed store; one ``docker-registry`` (Distribution 2.8, Debian) on 127.0.0.1 with its own
filesystem storage; the artifact also written once into an OCI layout by our push.

Push, ours: ``appliance.oci.push.push`` from the seed store to a fresh repository: sha256 of
each file, upload of each layer, config, model manifest, signature referrer and the
referrers tag. Native: ``skopeo copy --all oci:LAYOUT:TAG docker://REGISTRY/fresh:TAG`` of
the same artifact (same bytes, same registry).

Pull, ours: ``appliance.oci.pull.pull`` into a fresh store: referrer fetched and
authenticated, ranged layer reads cut into the signed chunks, each BLAKE3-checked, pwritten,
fsynced, published and indexed. Native: ``skopeo copy --all docker://REGISTRY/repo:TAG
oci:DIR:TAG`` (sha256-checked download into a layout). Best of the repetitions.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx

from appliance.oci.layout import OciLayout
from appliance.oci.pull import pull
from appliance.oci.push import push, store_model
from appliance.oci.registry import Registry, parse_reference
from appliance.store import trust_state
from bench.harness import BenchContext, Comparison, mb_per_s, run_native, timed
from bench.signed_bundle import prepare


def _start_registry(base: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError("docker-registry is not installed (run scripts/setup.sh)")
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n"
    )
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("docker-registry did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(ctx: BenchContext) -> list[Comparison]:
    work = ctx.workdir / "bench_oci"
    setup = prepare(ctx, work, generated_mib=(32, 256))
    seed = setup.seed_store(work / "seed", work / "media", keep_media=True)
    source = store_model(seed, "bench")
    layout = work / "layout"
    push(source, OciLayout(layout, create=True), "v1")
    repeats = 1 if ctx.quick else 3
    push_ours: list[float] = []
    push_native: list[float] = []
    pull_ours: list[float] = []
    pull_native: list[float] = []
    for i in range(repeats):
        # A fresh registry (new port, empty storage) for each push: skopeo's blob-info cache
        # would otherwise mount blobs it saw earlier instead of uploading them.
        ours_port, native_port = _free_port(), _free_port()
        ours_reg = _start_registry(work / f"registry-ours-{i}", ours_port)
        native_reg = _start_registry(work / f"registry-native-{i}", native_port)
        try:
            ref = parse_reference(f"127.0.0.1:{ours_port}/bench/model:v1")
            with Registry(ref, plain_http=True) as target:
                push_ours.append(timed(lambda t=target: push(source, t, "v1")))  # type: ignore[misc]
            push_native.append(timed(lambda p=native_port: run_native([  # type: ignore[misc]
                "skopeo", "copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:v1",
                f"docker://127.0.0.1:{p}/bench/model:v1"])))
            store = work / f"store-{i}"
            trust_state.install_first_root(store, setup.root_bytes, setup.fingerprint,
                                           setup.now)
            with Registry(ref, plain_http=True) as target:
                pull_ours.append(timed(lambda t=target, s=store: pull(  # type: ignore[misc]
                    s, t, "v1", now=setup.now)))
            shutil.rmtree(store)
            out = work / f"skopeo-{i}"
            pull_native.append(timed(lambda p=ours_port, out=out: run_native([  # type: ignore[misc]
                "skopeo", "copy", "--all", "--src-tls-verify=false",
                f"docker://127.0.0.1:{p}/bench/model:v1", f"oci:{out}:v1"])))
            shutil.rmtree(out)
        finally:
            for proc in (ours_reg, native_reg):
                proc.terminate()
                proc.wait(10)
        shutil.rmtree(work / f"registry-ours-{i}")
        shutil.rmtree(work / f"registry-native-{i}")
    size = setup.size
    what = f"{setup.label}, {size / 1e6:.0f} MB"
    note = f"best of {repeats}, loopback Distribution 2.8 registry"
    return [
        Comparison(f"oci push ({what})", "MB/s", mb_per_s(size, min(push_ours)),
                   mb_per_s(size, min(push_native)),
                   "skopeo copy --all oci:LAYOUT:TAG docker://REGISTRY/REPO:TAG",
                   note + "; ours hashes from the store and pushes the signature referrer"),
        Comparison(f"oci pull ({what})", "MB/s", mb_per_s(size, min(pull_ours)),
                   mb_per_s(size, min(pull_native)),
                   "skopeo copy --all docker://REGISTRY/REPO:TAG oci:DIR:TAG",
                   note + "; ours authenticates, checks every chunk, publishes into a store"),
    ]
