"""Run every benchmark in bench/ and write bench/results/latest.{json,md}.

Usage: .venv/bin/python -m bench.run [--quick] [--large] [--only NAME] [--fanout-mb N] [--out DIR]

Each bench/bench_<area>.py compares appliance with a native tool (zstd, b3sum, cp, curl,
in-process llama-cpp-python) in this same run; the table shows both figures and the ratio.
A module with ``costs(ctx)`` instead of ``run(ctx)`` (bench_hostile: what refusing hostile
input costs) adds its own table, from its ``markdown(rows)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from appliance.tiny_model import write_tiny_llama
from bench.harness import BenchContext, Comparison

BENCH_DIR = Path(__file__).resolve().parent


def _discover(only: str | None) -> list[str]:
    names = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
    wanted = only.split(",") if only else None
    return [n for n in names if wanted is None or any(w in n for w in wanted)]


def _model_path() -> Path | None:
    try:
        from appliance.default_model import default_model_path

        return default_model_path()
    except Exception as e:  # the gemma package is optional for a bench run
        print(f"(no default model: {e}; benchmarks use generated data)", file=sys.stderr)
        return None


def _markdown(rows: list[Comparison], meta: dict[str, str]) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}` "
        f"(load average at the end: {meta['load']}).",
        "",
        "| benchmark | unit | appliance | native | native tool | ratio | peak RSS ours / native "
        "| CPU s ours / native |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        rss = (f"{r.ours_rss_mb:.0f} / {r.native_rss_mb:.0f} MB"
               if r.ours_rss_mb is not None and r.native_rss_mb is not None else "")
        cpu = (f"{r.ours_cpu_s:.1f} / {r.native_cpu_s:.1f}"
               if r.ours_cpu_s is not None and r.native_cpu_s is not None else "")
        lines.append(
            f"| {r.name} | {r.unit} | {r.ours:.1f} | {r.native:.1f} | `{r.native_tool}` "
            f"| {r.ratio:.2f}x | {rss} | {cpu} |"
        )
    notes = sorted({r.note for r in rows if r.note})
    return "\n".join([*lines, "", *(f"- {n}" for n in notes)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs (smoke run)")
    parser.add_argument("--large", action="store_true",
                        help="also the generated 6.3 GB GGUF and its split variant, cached in "
                             "~/.cache/appliance-bench (bench/large_model.py)")
    parser.add_argument("--only", help="run only benchmarks whose module name contains this "
                                       "(several: a,b,c)")
    parser.add_argument("--fanout-mb", type=int, default=0, metavar="N",
                        help="the site fan-out benches (fanout, torrent) on a generated model "
                             "of N MiB instead of 48 (bench_fanout.model_mib)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)

    rows: list[Comparison] = []
    tables: list[str] = []
    costs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="appliance-bench-", dir=BENCH_DIR.parent) as tmp:
        work = Path(tmp)
        tiny = write_tiny_llama(work / "tiny.gguf")
        ctx = BenchContext(workdir=work, model_path=None if args.quick else _model_path(),
                           tiny_model_path=tiny, quick=args.quick, large=args.large,
                           fanout_mib=args.fanout_mb)
        for name in _discover(args.only):
            module = importlib.import_module(f"bench.{name}")
            start = time.perf_counter()
            print(f"==> {name}", flush=True)
            if hasattr(module, "costs"):
                measured = module.costs(ctx)
                tables.append(module.markdown(measured))
                costs.extend(c.to_json() for c in measured)
                print(tables[-1], flush=True)
                continue
            results = module.run(ctx)
            for r in results:
                print(f"    {r.name}: {r.ours:.1f} vs {r.native:.1f} {r.unit} "
                      f"({r.native_tool}) = {r.ratio:.2f}x; peak RSS {r.ours_rss_mb} vs "
                      f"{r.native_rss_mb} MB; CPU {r.ours_cpu_s} vs {r.native_cpu_s} s; "
                      f"{r.note}", flush=True)
            print(f"    ({time.perf_counter() - start:.1f} s, load {_load()})", flush=True)
            rows.extend(results)

    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{platform.machine()}, {_cpu_count()} cores, Python {platform.python_version()}"
        ),
        "command": "python -m bench.run" + (" --quick" if args.quick else "")
        + (" --large" if args.large else "") + (f" --only {args.only}" if args.only else "")
        + (f" --fanout-mb {args.fanout_mb}" if args.fanout_mb else ""),
        "load": _load(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(
        json.dumps({"meta": meta, "results": [r.to_json() for r in rows], "costs": costs},
                   indent=2) + "\n"
    )
    (args.out / "latest.md").write_text("\n".join([_markdown(rows, meta), *tables]))
    print(f"\nwrote {args.out / 'latest.md'}")
    return 0


def _load() -> str:
    import os

    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
