"""Helpers for the image tests: trees with SHA256SUMS, ISOs made and extracted by xorriso,
byte flips, and build_iso.sh runs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from appliance.iso import CHECKSUMS_NAME, render_checksums

REPO = Path(__file__).resolve().parent.parent
BUILD_ISO = REPO / "build_iso.sh"
BUILD_BINARY = REPO / "packaging" / "build_binary.py"
CLEAN_PATH = "/usr/bin:/bin"
BASH = shutil.which("bash") or "/bin/bash"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tree(root: Path, files: dict[str, bytes], *, sums: bool = True) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if sums:
        (root / CHECKSUMS_NAME).write_bytes(
            render_checksums({rel: sha256(data) for rel, data in files.items()})
        )
    return root


def make_iso(src: Path, out: Path, *options: str) -> Path:
    subprocess.run(
        ["xorriso", "-no_rc", "-report_about", "FAILURE", "-outdev", f"stdio:{out}",
         "-compliance", "iso_9660_level=3", "-joliet", "on", *options, "-map", str(src), "/",
         "-commit", "-end"],
        check=True, capture_output=True,
    )
    return out


def extract_iso(image: Path, dest: Path) -> Path:
    subprocess.run(
        ["xorriso", "-no_rc", "-report_about", "FAILURE", "-osirrox", "on", "-indev", str(image),
         "-extract", "/", str(dest)],
        check=True, capture_output=True,
    )
    for path in [dest, *dest.rglob("*")]:  # xorriso extracts read-only dirs; let tmp cleanup in
        if path.is_dir():
            path.chmod(0o755)
    return dest


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def run_build_iso(args: Sequence[str], env: dict[str, str] | None = None,
                  timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(BUILD_ISO), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
