"""Peak disk use of one ``torrent fetch``: the fetching store's allocated bytes, sampled.

Not part of ``bench.run`` (one number, no comparison against another tool): run it by hand,

    .venv/bin/python -m bench.torrent_disk [--model FILE] [--mib N] [--rate MB/S]

It builds a signed one-model bundle (the model file given, else N MiB of generated weights),
imports it into a seed store, seeds it with ``Seeder`` in this process (upload capped at
``--rate`` so the fetch lasts long enough to sample), runs the real ``appliance torrent fetch``
CLI into a fresh store, and samples the fetching store's allocated blocks (``st_blocks``, links
not followed: what the disk really holds) every 20 ms. Prints the model size, the peak, and
the peak over the model size; the store's index, WAL and audit log are part of the peak.
Run it with ``PYTHONPATH`` pointing at another checkout to measure that version.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from appliance.torrent.make import model_torrent
from appliance.torrent.seed import Seeder
from appliance.torrent.session import SwarmOptions
from bench.harness import BenchContext
from bench.signed_bundle import prepare

MIB = 1 << 20


def allocated(root: Path) -> int:
    total = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                continue  # renamed or removed while we walked
    return total


def measure(work: Path, model: Path | None, mib: int, rate: float) -> dict[str, float]:
    ctx = BenchContext(workdir=work, model_path=model, tiny_model_path=work / "none",
                       quick=False)
    setup = prepare(ctx, work / "bundle", generated_mib=(mib, mib))
    seed = setup.seed_store(work / "seed", work / "media")
    data, _ = model_torrent(seed, "bench", root_cert=None)
    torrent = work / "bench.torrent"
    torrent.write_bytes(data)
    fetcher = work / "fetcher"
    setup.trust(fetcher)
    base = allocated(fetcher)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, allocated(fetcher))
            time.sleep(0.02)

    with Seeder(seed, SwarmOptions(listen="127.0.0.1:0", lsd=False), identity=None) as seeder:
        seeder.add_published()
        seeder.set_upload_rate(int(rate * 1e6))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", "--store", str(fetcher), "torrent",
             "fetch", str(torrent), "--insecure", "--no-lsd", "--listen", "127.0.0.1:0",
             "--peer", f"127.0.0.1:{seeder.port}"],
            check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
    return {"model_bytes": setup.size, "peak_bytes": peak - base,
            "after_bytes": allocated(fetcher) - base, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model file (default: generated)")
    parser.add_argument("--mib", type=int, default=64, help="generated weights (MiB)")
    parser.add_argument("--rate", type=float, default=40.0, help="seeder upload MB/s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="torrent-disk-", dir=os.environ.get("TMPDIR")) as t:
        got = measure(Path(t), args.model, args.mib, args.rate)
    size = got["model_bytes"]
    print(f"model {size / MIB:.1f} MiB, fetch {got['seconds']:.1f} s: peak "
          f"{got['peak_bytes'] / MIB:.1f} MiB = {got['peak_bytes'] / size:.2f}x the model, "
          f"after {got['after_bytes'] / MIB:.1f} MiB = {got['after_bytes'] / size:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
