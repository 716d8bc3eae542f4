"""Benchmark harness: each ``bench/bench_<area>.py`` compares appliance with a native tool.

A benchmark module defines ``run(ctx: BenchContext) -> list[Comparison]``. ``bench/run.py``
imports every ``bench_*.py``, runs them in one process on one machine, and writes
``bench/results/latest.json`` and ``bench/results/latest.md`` (the README's table).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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
