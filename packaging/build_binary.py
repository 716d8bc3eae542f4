"""Build dist/appliance/ (one directory, PyInstaller) or reuse it when its inputs have not changed.

Run with the project's venv Python: ``.venv/bin/python packaging/build_binary.py [--force]``.
It prints the build's directory on the last line of stdout (build_iso.sh reads it); the
command is its ``appliance`` launcher (``dist/appliance/appliance``), the rest is in
``_internal/``.

A build is fresh when ``dist/appliance.inputs`` holds the same digest as now. The digest
covers what ends up inside it: every file of the appliance package, the spec and entry
point, pyproject.toml, the Python version, the name and version of every installed
distribution, and the bytes of llama.cpp's shared libraries and of llama-server (a rebuild
with other CMAKE_ARGS keeps the same version number). Build output goes to build/pyinstaller
and dist/ (gitignored).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

PACKAGING = Path(__file__).resolve().parent
REPO = PACKAGING.parent
SPEC = PACKAGING / "appliance.spec"
ENTRY = PACKAGING / "appliance_main.py"
BINARY_NAME = "appliance"
INPUTS_SUFFIX = ".inputs"
LLAMA_SERVER = REPO / ".venv" / "bin" / "llama-server"  # the spec takes it from here
SKIP_DIRS = frozenset({"__pycache__"})


def _package_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.endswith(".pyc"))
    return files


def _llama_libs() -> list[Path]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise SystemExit("llama_cpp is not installed in this Python: run scripts/setup.sh")
    lib_dir = Path(spec.origin).parent / "lib"
    return sorted(p for p in lib_dir.iterdir() if p.is_file() and not p.is_symlink())


def inputs_digest() -> str:
    """Digest of everything that decides the binary's content."""
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    add("python", sys.version.encode())
    for path in [*_package_files(REPO / "appliance"), SPEC, ENTRY, REPO / "pyproject.toml"]:
        add(f"file:{path.relative_to(REPO)}", path.read_bytes())
    for lib in _llama_libs():
        add(f"lib:{lib.name}", lib.read_bytes())
    if LLAMA_SERVER.is_file():
        add("llama-server", LLAMA_SERVER.read_bytes())
    dists = sorted(
        f"{d.metadata['Name']}=={d.version}".lower() for d in importlib.metadata.distributions()
    )
    add("dists", "\n".join(dists).encode())
    return h.hexdigest()


def build(dist_dir: Path, work_dir: Path, *, force: bool = False) -> Path:
    """The fresh one-directory build (built now or reused): its directory."""
    out = dist_dir / BINARY_NAME
    launcher = out / BINARY_NAME
    stamp = dist_dir / (BINARY_NAME + INPUTS_SUFFIX)
    digest = inputs_digest()
    fresh = stamp.is_file() and stamp.read_text().strip() == digest
    if not force and fresh and launcher.is_file() and os.access(launcher, os.X_OK):
        print(f"reusing fresh build {out} (inputs {digest[:12]})", file=sys.stderr)
        return out
    if importlib.util.find_spec("PyInstaller") is None:
        raise SystemExit("PyInstaller is missing: .venv/bin/pip install -e '.[iso]'")
    print(f"building {out} with PyInstaller (a few minutes)...", file=sys.stderr)
    started = time.monotonic()
    stamp.unlink(missing_ok=True)
    if out.is_file() or out.is_symlink():  # the one-file binary of earlier versions
        out.unlink()
    subprocess.run(
        [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "ERROR",
         "--distpath", str(dist_dir), "--workpath", str(work_dir), str(SPEC)],
        check=True,
        cwd=REPO,
    )
    # Written only after a successful build, so a failed one is never taken for fresh.
    stamp.write_text(digest + "\n")
    print(f"built {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=REPO / "dist", help="output dir (dist/)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "pyinstaller",
                        help="PyInstaller work dir (build/pyinstaller)")
    parser.add_argument("--force", action="store_true", help="rebuild even when fresh")
    args = parser.parse_args()
    try:
        out = build(args.dist.resolve(), args.work.resolve(), force=args.force)
    except subprocess.CalledProcessError as e:
        print(f"PyInstaller failed (exit {e.returncode})", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
