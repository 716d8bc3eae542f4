"""Start-up of the PyInstaller binary: wall time of short commands, median of N runs.

Issue 22 item 3: the binary on the image starts a command in at most 0.5 s. Each binary
given runs each command N times in a clean environment (PATH=/usr/bin:/bin, a fresh HOME, no
venv), the binaries taking turns run by run so that a change in the machine's load falls on
all of them alike. Not part of ``bench.run``: it needs a built binary.

    .venv/bin/python packaging/build_binary.py
    .venv/bin/python -m bench.bench_binary_start dist/appliance/appliance [OTHER_BINARY ...]

A one-directory build is measured where it lies; give an image's copy
(``xorriso -osirrox on -indev appliance.iso -extract / DIR``) to measure that.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

CLEAN_PATH = "/usr/bin:/bin"
AIM_SECONDS = 0.5


def commands(store: Path) -> dict[str, list[str]]:
    """Label -> arguments. ``models list`` on an empty store: the store exists, holds nothing."""
    return {
        "--help": ["--help"],
        "--version": ["--version"],
        "models list (empty store)": ["--store", str(store), "models", "list"],
    }


def make_empty_store(store: Path) -> None:
    """A store that exists and holds nothing (a fresh host's, before its first import)."""
    from appliance.store.store import Store

    with Store(store):
        pass


def time_once(binary: Path, args: list[str], home: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([str(binary), *args], env={"PATH": CLEAN_PATH, "HOME": str(home)},
                          cwd=home, capture_output=True, check=False, timeout=120)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{binary} {' '.join(args)}: exit {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        store = Path(tmp) / "store"
        make_empty_store(store)
        times: dict[tuple[Path, str], list[float]] = {}
        for binary in args.binaries:  # one untimed run each: page cache warm for all alike
            time_once(binary, ["--version"], home)
        for _ in range(args.runs):
            for label, cmd in commands(store).items():
                for binary in args.binaries:
                    times.setdefault((binary, label), []).append(time_once(binary, cmd, home))
    print(f"median of {args.runs} runs, clean environment (aim: at most {AIM_SECONDS} s)")
    print("| binary | command | median | min | max |")
    print("|---|---|---:|---:|---:|")
    for (binary, label), values in times.items():
        print(f"| `{binary}` | `{label}` | {statistics.median(values):.2f} s | "
              f"{min(values):.2f} s | {max(values):.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
