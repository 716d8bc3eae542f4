"""Site fan-out: one seed and N hosts on links capped with ``tc``, swarm pull vs a central server.

Set-up: a generated GGUF (48 MiB, 32 MiB with ``--quick``, N MiB with ``bench.run --fanout-mb
N``: 1 MiB tensors, so chunks about as big as gemma3-270m's) built into a signed bundle and
imported into the seed's store. A test-made LAN (``appliance.testlan.Lan``: one network
namespace per host on a bridge, names ``apfo-<pid>-*``, addresses 10.x.0.y inside them only,
deleted afterwards) caps every host's veth with a ``tc`` token bucket of ``RATE_MBIT`` in both
directions, as a full-duplex link: the seed uploads at most that in total and each host
downloads at most that. The rate is low enough that the 2-core machine is not the bottleneck,
so the transfers are link-bound. Every host command is a real ``appliance`` CLI process run
with ``ip netns exec``; servers are plaintext (``--insecure``: site TLS costs CPU, not link
time) without mDNS (``--no-advertise``, ``--no-mdns``), so no traffic leaves the namespaces.

Measured, each from the first process start to the last process exit, every host ending with
the model verified and published in its store:

- T1: one host pulls the model from the seed alone (``peer pull bench --from SEED``).
- Tc, central server: N hosts pull at once, each from the seed only.
- Ts, swarm: each of the N hosts first runs ``peer serve`` on its own (empty) store, then all
  pull at once with the seed and every other host as peers, so a host may fetch what another
  has verified meanwhile.

Rows: the site's delivered throughput (N x size / time) swarm vs central (ratio Tc/Ts), and
the per-host rate of the swarm vs a single transfer (ratio T1/Ts; aim Ts <= 1.5 x T1, so a
ratio >= 0.67, where the central server needs about N x T1).

Where the time goes, printed with each phase: the bytes the seed's link sent (the ``tc``
counter of its veth: every protocol, headers included) over the model's size; when each host's
process exited (first, median, last); and, once every host holds the model, the same N pulls
again (nothing to fetch: process start, offers, manifest authentication), the start-up a
phase pays on this machine whatever the network does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from appliance.store import audit, trust_state
from appliance.store.records import get_model
from appliance.testlan import Lan
from bench.harness import BenchContext, Comparison
from bench.signed_bundle import BenchBundle, prepare

RATE_MBIT = 80  # per link and direction; 9 hosts x 10 MB/s stays well under 2 cores' worth
QUICK_MIB, FULL_MIB = 32, 48
PORT = 8765
MODEL = "bench"
APPLIANCE = str(Path(sys.executable).with_name("appliance"))


@dataclasses.dataclass(frozen=True)
class Phase:
    seconds: float
    from_seed: int  # bytes the pullers received from the seed, summed
    from_hosts: int  # bytes they received from other pullers, summed
    seed_sent: int = 0  # bytes out of the seed's link (its tc counter), any protocol
    done: tuple[float, ...] = ()  # seconds until each host's process exited, ascending
    noop: float | None = None  # the same pulls again once every host holds the model
    cpu: float = 0.0  # CPU seconds of the hosts' fetch commands (user + system)
    began: tuple[float, ...] = ()  # seconds until each host had received 5 % of the model
    busy: float = 0.0  # share of all this machine's cores busy during the phase (/proc/stat)
    servers_cpu: float = 0.0  # CPU seconds of the hosts' peer servers during the phase

    def timeline(self, size: int) -> str:
        """What bounds the phase: the seed's upload over the model, and the hosts' spread."""
        parts = [f"seed link sent {self.seed_sent / size:.2f}x the model"]
        if self.began:
            parts.append(f"hosts' downloads began at {self.began[0]:.1f} / "
                         f"{self.began[len(self.began) // 2]:.1f} / {self.began[-1]:.1f} s")
        if self.done:
            parts.append(f"hosts done at {self.done[0]:.1f} / "
                         f"{self.done[len(self.done) // 2]:.1f} / {self.done[-1]:.1f} s "
                         "(first / median / last)")
        if self.cpu:
            parts.append(f"{self.cpu:.1f} CPU s in the hosts' fetches "
                         f"({self.cpu / self.seconds:.1f} of this machine's {os.cpu_count()} "
                         "cores)")
        if self.servers_cpu:
            parts.append(f"{self.servers_cpu:.1f} CPU s in the hosts' peer servers")
        if self.busy:
            parts.append(f"the machine's cores {self.busy:.0%} busy (everyone's processes)")
        if self.noop is not None:
            parts.append(f"the same pulls with nothing to fetch {self.noop:.1f} s")
        return ", ".join(parts)


class _Site:
    """The LAN, the seed's store and server, and fresh stores for the pullers of a phase."""

    def __init__(self, lan: Lan, setup: BenchBundle, work: Path) -> None:
        self.lan, self.setup, self.work = lan, setup, work
        self.procs: list[subprocess.Popen[str]] = []
        self.began: dict[int, float] = {}  # host -> seconds until 5 % of the model arrived
        self.busy = 0.0  # share of the machine's cores busy during the last run_all

    def url(self, host: int) -> str:
        return f"http://{self.lan.addresses[host]}:{PORT}"

    def seed_sent(self) -> int:
        """Bytes the seed's veth has sent so far (its egress tbf's counter)."""
        out = subprocess.run(self.lan.command(0, ["tc", "-s", "qdisc", "show", "dev", "eth0"]),
                             check=True, capture_output=True, text=True).stdout
        found = re.search(r"Sent (\d+) bytes", out)
        if found is None:
            raise RuntimeError(f"no tc counter on the seed's link: {out!r}")
        return int(found.group(1))

    def received(self) -> dict[int, int]:
        """Bytes each host's link has delivered to it so far (the switch-side tbf counters)."""
        out = subprocess.run(["ip", "netns", "exec", self.lan.switch, "tc", "-s", "qdisc",
                              "show"], check=True, capture_output=True, text=True).stdout
        got = {}
        for dev, sent in re.findall(r"dev p(\d+) root.*?\n\s*Sent (\d+) bytes", out):
            got[int(dev)] = int(sent)
        return got

    def run_all(self, commands: dict[int, list[str]], tag: str, *,
                done_line: Callable[[str], bool] | None = None
                ) -> tuple[float, tuple[float, ...], list[subprocess.Popen[str]], float]:
        """Start every host's command at once; seconds until the last is done, each one's
        done time, the processes still running, and the CPU seconds of those that exited. A
        host is done when its command exits 0, or when its log has a line ``done_line``
        accepts while the command goes on (it stays a source for the others, as ``peer
        serve`` does). A failure stops the benchmark with its log."""
        running: dict[int, subprocess.Popen[str]] = {}
        logs = {host: self.work / f"{tag}-{host}.log" for host in commands}
        cpu = _children_cpu()
        ticks = _cpu_ticks()
        base = self.received()
        self.began = {}
        sampled = 0.0
        start = time.perf_counter()
        for host, argv in commands.items():
            with logs[host].open("w") as log:
                running[host] = subprocess.Popen(self.lan.command(host, argv), stdout=log,
                                                 stderr=subprocess.STDOUT, text=True)
            self.procs.append(running[host])
        done: dict[int, float] = {}
        while len(done) < len(running):
            for host, proc in running.items():
                if host in done:
                    continue
                code = proc.poll()
                if code is not None and code != 0:
                    raise RuntimeError(f"{tag} in {self.lan.hosts[host]} failed: "
                                       f"{logs[host].read_text()[-2000:]}")
                if code == 0 or (done_line is not None and any(
                        map(done_line, logs[host].read_text().splitlines()))):
                    done[host] = time.perf_counter() - start
            moment = time.perf_counter() - start
            if moment - sampled >= 0.25:  # when each host's download got going
                sampled = moment
                for host, n in self.received().items():
                    if host in commands and host not in self.began and \
                            n - base.get(host, 0) > self.setup.size / 20:
                        self.began[host] = moment
            if moment > 600:
                raise RuntimeError(f"{tag}: hosts still running after 600 s")
            time.sleep(0.02)
        left = []
        for proc in running.values():
            if proc.poll() is None:
                left.append(proc)
            else:
                self.procs.remove(proc)
        self.busy = _busy_since(ticks)
        return max(done.values()), tuple(sorted(done.values())), left, _children_cpu() - cpu

    def new_store(self, name: str) -> Path:
        store = self.work / name
        shutil.rmtree(store, ignore_errors=True)
        trust_state.install_first_root(store, self.setup.root_bytes, self.setup.fingerprint,
                                       self.setup.now)
        return store

    def serve(self, host: int, store: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.lan.command(host, [APPLIANCE, "--store", str(store), "peer", "serve",
                                    "--insecure", "--no-advertise",
                                    "--listen", f"{self.lan.addresses[host]}:{PORT}"]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"the peer server in {self.lan.hosts[host]} did not start: "
                               f"{line!r}")
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)

    def pull_all(self, pullers: dict[int, Path], sources: dict[int, list[int]], *,
                 tag: str = "pull") -> Phase:
        """Start every puller at once; seconds until the last one holds the model."""
        commands = {
            host: [APPLIANCE, "--store", str(store), "peer", "pull", MODEL, "--insecure",
                   "--no-mdns", *(arg for s in sources[host] for arg in ("--from", self.url(s)))]
            for host, store in pullers.items()
        }
        sent = self.seed_sent()
        seconds, done, _, cpu = self.run_all(commands, tag)
        sent = self.seed_sent() - sent
        from_seed = from_hosts = 0
        for host, store in pullers.items():
            model = get_model(store, MODEL)  # published, verified, full size
            if sum(f.size for f in model.files) != self.setup.size:
                raise RuntimeError(f"{self.lan.hosts[host]} holds the wrong size")
            # The exact verified bytes per peer, from the pull's own audit record (the
            # summary it prints rounds them for people).
            pulled = [r for r in audit.records(store) if r.kind == "pull"][-1]
            for url, n in pulled.details["peers"].items():
                if url == self.url(0):
                    from_seed += int(n)
                else:
                    from_hosts += int(n)
        return Phase(seconds, from_seed, from_hosts, sent, done, cpu=cpu,
                     began=tuple(sorted(self.began.values())), busy=self.busy)

    def noop(self, pullers: dict[int, Path], sources: dict[int, list[int]]) -> float:
        """The same pulls again, every host already holding the model: start-up alone."""
        return self.pull_all(pullers, sources, tag="noop").seconds


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores so far (/proc/stat; idle and iowait are not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _busy_since(start: tuple[int, int]) -> float:
    busy, total = _cpu_ticks()
    return (busy - start[0]) / max(1, total - start[1])


def _process_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds of a running process (utime + stime in /proc/PID/stat), with those of its
    children it has waited for (cutime + cstime) when asked."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def _single(site: _Site) -> Phase:
    store = site.new_store("single")
    try:
        phase = site.pull_all({1: store}, {1: [0]})
        return dataclasses.replace(phase, noop=site.noop({1: store}, {1: [0]}))
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _central(site: _Site, n: int) -> Phase:
    stores = {h: site.new_store(f"central-{h}") for h in range(1, n + 1)}
    try:
        return site.pull_all(stores, {h: [0] for h in stores}, tag="central")
    finally:
        for store in stores.values():
            shutil.rmtree(store, ignore_errors=True)


def _swarm(site: _Site, n: int) -> Phase:
    stores = {h: site.new_store(f"swarm-{h}") for h in range(1, n + 1)}
    servers = []
    try:
        for host, store in stores.items():
            servers.append(site.serve(host, store))
        # The seed first, then the other pullers: every host is a source for every other.
        sources = {h: [0, *(o for o in stores if o != h)] for h in stores}
        before = [_process_cpu(p.pid) for p in servers]
        phase = site.pull_all(stores, sources, tag="swarm")
        served = sum(_process_cpu(p.pid) - b for p, b in zip(servers, before, strict=True))
        return dataclasses.replace(phase, noop=site.noop(stores, sources), servers_cpu=served)
    finally:
        for proc in servers:
            site.stop(proc)
        for store in stores.values():
            shutil.rmtree(store, ignore_errors=True)


def _weights_gguf(path: Path, mib: int) -> Path:
    """A GGUF of ``mib`` tensors of 1 MiB of random int8 (incompressible, like quantized
    weights); the chunker gives each tensor its own chunk, as gemma3-270m's average."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        writer.add_name("fan-out bench weights")
        for i in range(mib):
            writer.add_tensor(f"blk.{i}.weight",
                              rng.integers(-128, 127, size=(4096, 256), dtype=np.int8,
                                           endpoint=True))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def model_mib(ctx: BenchContext) -> int:
    """The generated model's size in MiB: ``--fanout-mb`` (a model large enough that T1 is
    not dominated by the hosts' start-up), else the default."""
    return ctx.fanout_mib or (QUICK_MIB if ctx.quick else FULL_MIB)


def seeded_store(ctx: BenchContext, work: Path) -> tuple[BenchBundle, Path]:
    """The fan-out model, built into a signed bundle and imported into the seed's store
    (``work/seed``); the fan-out benches (peer swarm, torrent) start from here."""
    work.mkdir(parents=True, exist_ok=True)
    # A generated GGUF even when gemma is installed (253 MB x 8 hosts at a capped rate would
    # take far longer than a benchmark run should), cut like gemma: about 1 MiB per chunk.
    weights = _weights_gguf(work / "weights.gguf", model_mib(ctx))
    setup = prepare(dataclasses.replace(ctx, model_path=weights), work, generated_mib=(0, 0),
                    model_when_quick=True)
    return setup, setup.seed_store(work / "seed", work / "media")


def run(ctx: BenchContext) -> list[Comparison]:
    why = Lan.available()
    if why is not None:
        print(f"    skipped: {why}", flush=True)
        return []
    work = ctx.workdir / "bench_fanout"
    setup, seed = seeded_store(ctx, work)
    sizes = (4,) if ctx.quick else (4, 8)
    rate = f"{RATE_MBIT}mbit"
    lan = Lan(1 + max(sizes), rate=rate, both_ways=True, prefix=f"apfo-{os.getpid()}-")
    site = _Site(lan, setup, work)
    try:
        site.serve(0, seed)
        single = _single(site)
        phases = {n: (_central(site, n), _swarm(site, n)) for n in sizes}
    finally:
        site.close()
        lan.close()
    t1 = single.seconds
    mb = setup.size / 1e6
    link = f"{RATE_MBIT} Mbit/s per link each way (tc tbf), plaintext peers"
    print(f"    T1 = {t1:.1f} s (single transfer, {mb:.0f} MB, {link}; "
          f"{single.timeline(setup.size)})", flush=True)
    rows = []
    for n, (central, swarm) in phases.items():
        tc, ts = central.seconds, swarm.seconds
        shared = swarm.from_hosts / (swarm.from_hosts + swarm.from_seed)
        print(f"    N={n}: Tc = {tc:.1f} s ({tc / t1:.2f}x T1), Ts = {ts:.1f} s "
              f"({ts / t1:.2f}x T1), swarm bytes from other hosts {shared:.0%}", flush=True)
        print(f"      central: {central.timeline(setup.size)}", flush=True)
        print(f"      swarm: {swarm.timeline(setup.size)}; received "
              f"{(swarm.from_seed + swarm.from_hosts) / (n * setup.size):.3f}x what the hosts "
              "needed", flush=True)
        times = (f"T1 {t1:.1f} s, Tc {tc:.1f} s, Ts {ts:.1f} s; {shared:.0%} of the swarm's "
                 f"bytes came from other hosts; {link}")
        rows.append(Comparison(
            f"site fan-out N={n}: swarm vs central server (generated, {mb:.0f} MB)",
            "MB/s delivered", n * mb / ts, n * mb / tc,
            f"{n} x appliance peer pull --from SEED (seed only)", times,
        ))
        rows.append(Comparison(
            f"fan-out N={n} time / single transfer (generated, {mb:.0f} MB)",
            "MB/s per host", mb / ts, mb / t1,
            "one host alone: appliance peer pull --from SEED",
            f"Ts/T1 = {ts / t1:.2f} (aim <= 1.5), central Tc/T1 = {tc / t1:.2f}; {times}",
        ))
    return rows
