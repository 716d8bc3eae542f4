"""Site fan-out over BitTorrent v2: libtorrent swarm vs our peer swarm vs one central server.

The same set-up as ``bench_fanout`` and its helpers (one seed and N hosts in test-made network
namespaces, every veth capped with ``tc`` at ``RATE_MBIT`` both ways, a generated 1 MiB-tensor
GGUF imported into the seed's store, real ``appliance`` CLI processes, plaintext, no mDNS, no
LSD, no DHT: nothing leaves the namespaces). Measured from the first process start to the last
process exit, every host ending with the model verified and published in its store:

- T1: one host pulls the model from the seed alone (``peer pull``): one transfer.
- Tc: N hosts pull at once from the seed only (one central server).
- Ts: our peer swarm (``peer serve`` on every host, ``peer pull`` from all of them).
- Tt: the torrent swarm: the seed runs ``torrent seed``, the N hosts run ``torrent fetch`` at
  once with the seed and every other host as static peers, and each host, once its fetch has
  published the model, goes on as ``torrent seed`` with the same peers (as a site runs it, and
  as every host of the peer swarm keeps ``peer serve`` up): a host is done when its fetch
  printed the published model, and the seeds are stopped once every host is done.

Aim: Tt <= 1.3 x T1 at N = 8. ``bench.run --only torrent --fanout-mb 400`` runs it on a
generated model of 400 MiB instead of 48 (T1 about 45 s at 80 Mbit/s instead of 6, so the
hosts' start-up, about 1.5 s of CPU each, no longer weighs as much as the transfer); it ends
with the table bench/README.md shows.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from appliance.store.records import get_model
from appliance.testlan import Lan
from bench.bench_fanout import (
    APPLIANCE,
    MODEL,
    RATE_MBIT,
    Phase,
    _central,
    _process_cpu,
    _single,
    _Site,
    _swarm,
    seeded_store,
)
from bench.harness import BenchContext, Comparison

TORRENT_PORT = 6881


def _torrent(site: _Site, seed: Path, torrent: Path, n: int) -> Phase:
    lan = site.lan
    seeder = subprocess.Popen(
        lan.command(0, [APPLIANCE, "--store", str(seed), "torrent", "seed", "--insecure",
                        "--no-lsd", "--listen", f"{lan.addresses[0]}:{TORRENT_PORT}"]),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    site.procs.append(seeder)
    stores = {h: site.new_store(f"torrent-{h}") for h in range(1, n + 1)}
    try:
        assert seeder.stdout is not None
        for line in seeder.stdout:
            if line.startswith("listening"):
                break
        else:
            raise RuntimeError("torrent seed did not start")
        commands = {}
        for host, store in stores.items():
            listen = ["--listen", f"{lan.addresses[host]}:{TORRENT_PORT}"]
            peers = [arg for other in (0, *stores) if other != host
                     for arg in ("--peer", f"{lan.addresses[other]}:{TORRENT_PORT}")]
            fetch = [APPLIANCE, "--store", str(store), "torrent", "fetch", str(torrent),
                     "--insecure", "--no-lsd", "--timeout", "60", *listen, *peers]
            then_seed = [APPLIANCE, "--store", str(store), "torrent", "seed", "--insecure",
                         "--no-lsd", *listen, *peers]
            commands[host] = ["sh", "-c", f"{shlex.join(fetch)} && exec {shlex.join(then_seed)}"]
        sent = site.seed_sent()
        seconds, done, seeding, cpu = site.run_all(  # the fetch's result line: "bench:1: published"
            commands, "torrent", done_line=lambda line: line.startswith(f"{MODEL}:")
            and ": published" in line)
        sent = site.seed_sent() - sent
        # Each host's shell ran its fetch and became its seed: CPU of both so far.
        cpu += sum(_process_cpu(proc.pid, children=True) for proc in seeding)
        for proc in seeding:
            site.stop(proc)
        for host, store in stores.items():
            model = get_model(store, MODEL)
            if sum(f.size for f in model.files) != site.setup.size:
                raise RuntimeError(f"{lan.hosts[host]} holds the wrong size")
        return Phase(seconds, 0, 0, sent, done, cpu=cpu,
                     began=tuple(sorted(site.began.values())), busy=site.busy)
    finally:
        site.stop(seeder)
        for store in stores.values():
            shutil.rmtree(store, ignore_errors=True)


def run(ctx: BenchContext) -> list[Comparison]:
    why = Lan.available()
    if why is not None:
        print(f"    skipped: {why}", flush=True)
        return []
    work = ctx.workdir / "bench_torrent"
    setup, seed = seeded_store(ctx, work)
    torrent = work / "bench.torrent"
    subprocess.run([APPLIANCE, "--store", str(seed), "torrent", "make", MODEL, "--insecure",
                    "-o", str(torrent)], check=True, capture_output=True)
    sizes = (4,) if ctx.quick else (4, 8)
    lan = Lan(1 + max(sizes), rate=f"{RATE_MBIT}mbit", both_ways=True,
              prefix=f"aptt-{os.getpid()}-")
    site = _Site(lan, setup, work)
    try:
        site.serve(0, seed)
        single = _single(site)
        phases = {n: (_central(site, n), _swarm(site, n), _torrent(site, seed, torrent, n))
                  for n in sizes}
    finally:
        site.close()
        lan.close()
    t1 = single.seconds
    mb = setup.size / 1e6
    link = f"{RATE_MBIT} Mbit/s per link each way (tc tbf), plaintext"
    print(f"    T1 = {t1:.1f} s (single transfer, {mb:.0f} MB, {link}; "
          f"{single.timeline(setup.size)})", flush=True)
    rows = []
    for n, (central, swarm, tor) in phases.items():
        tc, ts, tt = central.seconds, swarm.seconds, tor.seconds
        print(f"    N={n}: Tt (torrent) = {tt:.1f} s ({tt / t1:.2f}x T1), Ts (peer swarm) = "
              f"{ts:.1f} s ({ts / t1:.2f}x T1), Tc (central) = {tc:.1f} s "
              f"({tc / t1:.2f}x T1)", flush=True)
        for label, phase in (("torrent", tor), ("swarm", swarm), ("central", central)):
            print(f"      {label}: {phase.timeline(setup.size)}", flush=True)
        times = f"T1 {t1:.1f} s, Tt {tt:.1f} s, Ts {ts:.1f} s, Tc {tc:.1f} s; {link}"
        rows.append(Comparison(
            f"torrent fan-out N={n} time / single transfer (generated, {mb:.0f} MB)",
            "MB/s per host", mb / tt, mb / t1,
            "one host alone: appliance peer pull --from SEED",
            f"Tt/T1 = {tt / t1:.2f} (aim <= 1.3), peer swarm Ts/T1 = {ts / t1:.2f}, "
            f"central Tc/T1 = {tc / t1:.2f}; {times}",
        ))
        rows.append(Comparison(
            f"torrent vs peer swarm, fan-out N={n} (generated, {mb:.0f} MB)",
            "MB/s delivered", n * mb / tt, n * mb / ts,
            "appliance peer serve + peer pull on every host (our swarm)", times,
        ))
    print(table(t1, setup.size, phases), flush=True)
    return rows


def table(t1: float, size: int, phases: dict[int, tuple[Phase, Phase, Phase]]) -> str:
    """The bench/README.md table: each phase over T1, and what the seed's link sent."""
    lines = [f"T1 = {t1:.1f} s, model {size / 1e6:.0f} MB", "",
             "| N | central Tc/T1 | peer swarm Ts/T1 | torrent Tt/T1 "
             "| seed link sent: central / swarm / torrent |",
             "|---:|---:|---:|---:|---|"]
    for n, (central, swarm, tor) in phases.items():
        sent = " / ".join(f"{p.seed_sent / size:.2f}x" for p in (central, swarm, tor))
        lines.append(f"| {n} | {central.seconds / t1:.2f}x | {swarm.seconds / t1:.2f}x "
                     f"| {tor.seconds / t1:.2f}x | {sent} the model |")
    return "\n".join(lines)
