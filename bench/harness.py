"""Benchmark harness: each ``bench/bench_<area>.py`` compares appliance with a native tool.

A benchmark module defines ``run(ctx: BenchContext) -> list[Comparison]``. ``bench/run.py``
imports every ``bench_*.py``, runs them in one process on one machine, and writes
``bench/results/latest.json`` and ``bench/results/latest.md`` (the README's table).

``Pair`` runs one appliance step and its native tool each in a child process, alternating,
and keeps the median wall time and each side's peak RSS (``ru_maxrss`` of the child, from
``wait4``). An appliance step runs as ``python -m bench.harness MODULE:FUNCTION JSON``: the
child imports appliance first and times only the call, so interpreter start-up is not
counted (``appliance --help`` start-up is its own aim), while its RSS is all of it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Comparison:
    """One measured pair: appliance vs a native tool doing the same work in the same run."""

    name: str  # e.g. "bundle build (gemma3-270m, 253 MB)"
    unit: str  # e.g. "MB/s" or "tok/s"; higher is better
    ours: float
    native: float
    native_tool: str  # the exact native command or library compared against
    note: str = ""
    ours_rss_mb: float | None = None  # peak RSS of the appliance child (ru_maxrss)
    native_rss_mb: float | None = None  # peak RSS of the native tool's processes
    ours_cpu_s: float | None = None  # user + system CPU seconds of the child (median run)
    native_cpu_s: float | None = None

    @property
    def ratio(self) -> float:
        return self.ours / self.native if self.native else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 3)}


@dataclass(frozen=True)
class BenchContext:
    workdir: Path  # scratch space on the same disk as the store (deleted afterwards)
    model_path: Path | None  # the real gemma3-270m GGUF when installed, else None
    tiny_model_path: Path  # a tiny runnable GGUF made for this run
    quick: bool  # smaller inputs, fewer repetitions (CI smoke run)
    large: bool = False  # also the generated 6.4 GB GGUF and its split variant (large_model)
    fanout_mib: int = 0  # the fan-out benches' generated model in MiB (0: their default)


@dataclass(frozen=True)
class Subject:
    """One model the size-sensitive benches run on: its files (one, or a split set)."""

    label: str  # "gemma3-270m Q4_K_M", "generated 6.3 GB GGUF, 363 tensors"
    files: tuple[Path, ...]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def subjects(ctx: BenchContext) -> list[Subject]:
    """gemma when installed; with ``--large`` also the cached large GGUF and its shards."""
    found = []
    if ctx.model_path is not None:
        found.append(Subject("gemma3-270m Q4_K_M", (ctx.model_path,)))
    if ctx.large:
        from bench.large_model import large_gguf, split_gguf

        big = large_gguf()
        found.append(Subject("generated GGUF, 363 tensors", (big,)))
        shards = split_gguf()
        found.append(Subject(f"generated split GGUF, {len(shards)} shards", tuple(shards)))
    return found


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """Best wall-clock seconds of ``repeats`` runs (least disturbed by the other core)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one run of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_native(argv: Sequence[str], **kwargs: Any) -> None:
    """Run a native baseline tool; fail loudly if it is missing or fails."""
    if shutil.which(argv[0]) is None:
        raise RuntimeError(f"native baseline {argv[0]!r} is not installed (run scripts/setup.sh)")
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)


def drop_page_cache_hint(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages so both sides start equally cold."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        pass


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds if seconds > 0 else float("inf")


@dataclass(frozen=True)
class Measured:
    seconds: float
    rss_mb: float  # peak RSS of the child (ru_maxrss), MB
    cpu_s: float = 0.0  # user + system CPU seconds of the child


def _spawn(argv: Sequence[str], *, stdout: int | None = subprocess.DEVNULL
           ) -> tuple[float, float, float, str]:
    """Run ``argv`` under GNU time: wall seconds, the peak RSS in MB, CPU seconds, stdout.

    The peak is ``ru_maxrss`` of the command as GNU time's ``wait4`` sees it. Not ours:
    Linux carries the high-water mark across ``exec``, so a command forked straight from
    this (large) Python process would report this process's RSS; GNU time is small.
    """
    if shutil.which(argv[0]) is None:
        raise RuntimeError(f"native baseline {argv[0]!r} is not installed")
    with tempfile.NamedTemporaryFile("r", prefix="bench-rss-") as rss:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss.name, *argv],
                              stdout=stdout, text=True, check=False)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} ... exited {proc.returncode}")
        kib, user, system = rss.read().split()[-3:]
    return seconds, int(kib) / 1024, float(user) + float(system), proc.stdout or ""


def run_measured(argvs: Sequence[Sequence[str]]) -> Measured:
    """Run native commands one after the other (``cp`` then ``sync``): total wall time, and
    the largest peak RSS of any of them."""
    total = rss = cpu = 0.0
    for argv in argvs:
        seconds, peak, used, _ = _spawn(argv)
        total, rss, cpu = total + seconds, max(rss, peak), cpu + used
    return Measured(total, rss, cpu)


def run_child(target: str, **kwargs: Any) -> Measured:
    """``target`` ("bench.bench_x:function") called with ``kwargs`` in a fresh Python child:
    the time the call took inside it, and the child's peak RSS."""
    _, rss, cpu, out = _spawn(
        [sys.executable, "-m", "bench.harness", target, json.dumps(kwargs)],
        stdout=subprocess.PIPE)
    return Measured(float(json.loads(out.splitlines()[-1])["seconds"]), rss, cpu)


def page_cache_percent(paths: Sequence[Path]) -> float | None:
    """How much of these files is in the page cache now (``fincore``), or None."""
    if shutil.which("fincore") is None or not paths:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE",
                          *map(str, paths)], capture_output=True, text=True, check=False)
    res = size = 0
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            res, size = res + int(parts[0]), size + int(parts[1])
    return 100.0 * res / size if size else None


@dataclass
class Pair:
    """Alternating runs of ours and the native tool: medians and peak RSS of each side.

    ``cached``: the inputs whose page-cache residency is sampled before every run (the
    table states it), ``reset`` runs before every run (remove last run's output)."""

    repeats: int
    cached: Sequence[Path] = ()
    ours: list[Measured] = field(default_factory=list)
    native: list[Measured] = field(default_factory=list)
    residency: list[float] = field(default_factory=list)

    def run(self, ours: Callable[[], Measured], native: Callable[[], Measured],
            reset: Callable[[], None] = lambda: None) -> Pair:
        for i in range(self.repeats):
            # Alternate which side goes first, so neither always inherits the other's cache.
            order = [(self.native, native), (self.ours, ours)]
            for runs, fn in order if i % 2 == 0 else order[::-1]:
                reset()
                cached = page_cache_percent(self.cached)
                if cached is not None:
                    self.residency.append(cached)
                runs.append(fn())
        reset()
        return self

    def comparison(self, name: str, nbytes: int, native_tool: str, note: str = ""
                   ) -> Comparison:
        ours = statistics.median(m.seconds for m in self.ours)
        native = statistics.median(m.seconds for m in self.native)
        cache = ""
        if self.residency:
            cache = (f"; inputs {min(self.residency):.0f}-{max(self.residency):.0f} % "
                     "in page cache before each run")
        return Comparison(
            name, "MB/s", mb_per_s(nbytes, ours), mb_per_s(nbytes, native), native_tool,
            f"median of {self.repeats} alternating runs{cache}" + (f"; {note}" if note else ""),
            ours_rss_mb=max(m.rss_mb for m in self.ours),
            native_rss_mb=max(m.rss_mb for m in self.native),
            ours_cpu_s=statistics.median(m.cpu_s for m in self.ours),
            native_cpu_s=statistics.median(m.cpu_s for m in self.native),
        )


def _child_main(argv: list[str]) -> int:
    """``python -m bench.harness MODULE:FUNCTION JSON``: time one call, print its seconds."""
    module, _, name = argv[0].partition(":")
    fn = getattr(importlib.import_module(module), name)
    kwargs = json.loads(argv[1])
    started = time.perf_counter()
    fn(**kwargs)
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
