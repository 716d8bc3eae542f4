"""Tests for the appliance image: SHA256SUMS, the ISO reader, build_iso.sh and the one-file binary.

Fast tests build small ISOs with xorriso and check ``appliance.iso`` against xorriso's own
extraction. The slow tests build the PyInstaller binary once per session (reused while its
inputs are unchanged), build images with build_iso.sh from a bundle made here with the tiny
GGUF, extract them with xorriso (no mount), and run the extracted binary in a clean
environment (PATH=/usr/bin:/bin, a fresh HOME, no venv, no PYTHONPATH): --version, doctor,
iso verify, trust install, bundle verify, import, and one completion through serve.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from appliance.cli.main import main
from appliance.errors import (
    FormatError,
    IntegrityError,
    LimitExceededError,
    TruncatedError,
    UnsafePathError,
    UsageError,
)
from appliance.iso import (
    CHECKSUMS_NAME,
    MAX_CHECKSUMS_BYTES,
    SECTOR,
    list_image,
    parse_checksums,
    render_checksums,
    verify,
    verify_image,
    verify_tree,
)

REPO = Path(__file__).resolve().parent.parent
BUILD_ISO = REPO / "build_iso.sh"
BUILD_BINARY = REPO / "packaging" / "build_binary.py"
CLEAN_PATH = "/usr/bin:/bin"
BASH = shutil.which("bash") or "/bin/bash"
EPOCH = "1767225600"  # 2026-01-01
LONG_NAME = "n" * 230 + ".txt"  # too long for one directory record: needs a CE area
IMAGE_TOP = {"appliance", "root.yaml", "ROOT-FINGERPRINT.txt", "OPERATOR.md", CHECKSUMS_NAME}


# -- helpers ----------------------------------------------------------------------------------


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


SAMPLE = {
    "x.txt": b"hello\n",
    "empty": b"",
    "a/b/c/big.bin": bytes(range(256)) * 1200,
    f"a/{LONG_NAME}": b"long name\n",
    "bundle/vol-001/manifest.yaml": b"channel: test\n",
}


@pytest.fixture
def sample_iso(tmp_path: Path) -> Path:
    return make_iso(write_tree(tmp_path / "src", SAMPLE), tmp_path / "sample.iso")


# -- SHA256SUMS -------------------------------------------------------------------------------

GOOD_HASH = "ab" * 32


def test_checksums_round_trip_sorted_like_lc_all_c() -> None:
    entries = {"b/x": GOOD_HASH, "B": "cd" * 32, "a": "ef" * 32}
    data = render_checksums(entries)
    assert data.decode().splitlines()[0].endswith("  B")  # uppercase sorts first in C order
    assert parse_checksums(data) == entries


def test_checksums_accepts_binary_marker_and_uppercase_hex() -> None:
    assert parse_checksums(f"{GOOD_HASH.upper()} *bin/app\n".encode()) == {"bin/app": GOOD_HASH}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        f"{GOOD_HASH} one-space-only\n".encode(),  # "HASH path" lacks the second column char
        f"{GOOD_HASH[:-2]}  short-hash\n".encode(),
        f"\\{GOOD_HASH}  escaped\\nname\n".encode(),  # coreutils escapes odd names: refused
        f"{GOOD_HASH}  \xff\xfe\n".encode("latin-1"),
    ],
)
def test_checksums_malformed(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_checksums(data)


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../b", "a//b", "./a", "a\\b"])
def test_checksums_unsafe_path(path: str) -> None:
    with pytest.raises(UnsafePathError):
        parse_checksums(f"{GOOD_HASH}  {path}\n".encode())


def test_checksums_duplicate_path() -> None:
    with pytest.raises(UnsafePathError):
        parse_checksums(f"{GOOD_HASH}  a\n{GOOD_HASH}  a\n".encode())


def test_checksums_size_cap() -> None:
    line = f"{GOOD_HASH}  a\n".encode()
    with pytest.raises(LimitExceededError):
        parse_checksums(line * (MAX_CHECKSUMS_BYTES // len(line) + 1))


# -- the ISO reader ---------------------------------------------------------------------------


def test_list_image_matches_xorriso_extraction(sample_iso: Path, tmp_path: Path) -> None:
    listed = {f.path: f for f in list_image(sample_iso)}
    extracted = extract_iso(sample_iso, tmp_path / "out")
    on_disk = {p.relative_to(extracted).as_posix() for p in extracted.rglob("*") if p.is_file()}
    assert set(listed) == on_disk == {*SAMPLE, CHECKSUMS_NAME}
    assert f"a/{LONG_NAME}" in listed  # the name continued in a CE area, read whole
    with sample_iso.open("rb") as fh:
        for path, entry in listed.items():
            data = b""
            for extent in entry.extents:
                fh.seek(extent.lba * SECTOR)
                data += fh.read(extent.length)
            assert data == (extracted / path).read_bytes(), path
            assert entry.size == len(data)


def test_verify_image_ok(sample_iso: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = verify_image(sample_iso, progress=lambda done, total: seen.append((done, total)))
    assert report.files == len(SAMPLE)
    assert report.bytes == sum(len(d) for d in SAMPLE.values())
    assert seen[-1] == (report.bytes, report.bytes)
    sums = next(f for f in list_image(sample_iso) if f.path == CHECKSUMS_NAME)
    with sample_iso.open("rb") as fh:
        fh.seek(sums.extents[0].lba * SECTOR)
        assert report.checksums_sha256 == sha256(fh.read(sums.size))


def test_verify_image_flipped_byte_names_the_file(sample_iso: Path) -> None:
    entry = next(f for f in list_image(sample_iso) if f.path == "a/b/c/big.bin")
    flip_byte(sample_iso, entry.extents[0].lba * SECTOR + 1000)
    with pytest.raises(IntegrityError) as caught:
        verify_image(sample_iso)
    assert caught.value.file == "a/b/c/big.bin"
    assert "checksum differs" in str(caught.value)


def test_verify_image_unlisted_file(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", SAMPLE)
    (src / "smuggled.sh").write_bytes(b"#!/bin/sh\n")
    with pytest.raises(IntegrityError) as caught:
        verify_image(make_iso(src, tmp_path / "extra.iso"))
    assert caught.value.file == "smuggled.sh"
    assert "not listed" in str(caught.value)


def test_verify_image_missing_file_and_counts_all_problems(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", SAMPLE)
    (src / "x.txt").unlink()
    (src / "empty").unlink()
    with pytest.raises(IntegrityError) as caught:
        verify_image(make_iso(src, tmp_path / "missing.iso"))
    assert caught.value.file == "empty"
    assert "and 1 more" in str(caught.value) and "x.txt" in str(caught.value)


def test_verify_image_without_checksum_list(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", SAMPLE, sums=False)
    with pytest.raises(IntegrityError) as caught:
        verify_image(make_iso(src, tmp_path / "nosums.iso"))
    assert caught.value.file == CHECKSUMS_NAME


def test_verify_image_cut_short(sample_iso: Path) -> None:
    last = max(list_image(sample_iso), key=lambda f: f.extents[0].lba + f.size / SECTOR)
    end = last.extents[0].lba * SECTOR + last.size
    with sample_iso.open("r+b") as fh:
        fh.truncate(end - 1)
    with pytest.raises(TruncatedError):
        verify_image(sample_iso)


def test_not_an_iso(tmp_path: Path) -> None:
    junk = tmp_path / "junk.iso"
    junk.write_bytes(os.urandom(40 * SECTOR))
    with pytest.raises(FormatError):
        verify_image(junk)


def test_tiny_file_is_not_an_iso(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.iso"
    tiny.write_bytes(b"CD001")
    with pytest.raises(TruncatedError):
        list_image(tiny)


def test_image_without_rock_ridge_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": b"a"})
    with pytest.raises(FormatError, match="Rock Ridge"):
        list_image(make_iso(src, tmp_path / "plain.iso", "-rockridge", "off"))


def test_symlink_in_image_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": b"a"})
    (src / "link").symlink_to("a.txt")
    with pytest.raises(FormatError, match="symbolic link"):
        list_image(make_iso(src, tmp_path / "link.iso"))


def test_directory_loop_is_refused(sample_iso: Path) -> None:
    # Point a subdirectory's record at the root directory's extent.
    data = bytearray(sample_iso.read_bytes())
    root_lba = int.from_bytes(data[16 * SECTOR + 158 : 16 * SECTOR + 162], "little")
    sub = bytes([ord("A")])  # ISO 9660 name of directory "a" in the root
    root = data[root_lba * SECTOR : root_lba * SECTOR + SECTOR]
    pos = 0
    while root[pos]:
        if root[pos + 32] == 1 and root[pos + 33 : pos + 34] == sub and root[pos + 25] & 2:
            start = root_lba * SECTOR + pos
            data[start + 2 : start + 6] = root_lba.to_bytes(4, "little")
            data[start + 6 : start + 10] = root_lba.to_bytes(4, "big")
            break
        pos += root[pos]
    else:
        raise AssertionError("directory record 'A' not found")
    looped = sample_iso.with_name("loop.iso")
    looped.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="loop"):
        list_image(looped)


def test_missing_image_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        verify(tmp_path / "nope.iso")


def test_verify_tree(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "disc", SAMPLE)
    assert verify_tree(root).files == len(SAMPLE)
    flip_byte(root / "x.txt", 0)
    with pytest.raises(IntegrityError) as caught:
        verify(root)
    assert caught.value.file == "x.txt"


def test_cli_iso_verify(sample_iso: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["iso", "verify", str(sample_iso), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["files"] == len(SAMPLE)
    entry = next(f for f in list_image(sample_iso) if f.path == "x.txt")
    flip_byte(sample_iso, entry.extents[0].lba * SECTOR)
    assert main(["iso", "verify", str(sample_iso)]) == 2
    assert "IntegrityError: x.txt: checksum differs" in capsys.readouterr().err


# -- build_iso.sh arguments and tool checks (no build) ----------------------------------------


def run_build_iso(args: Sequence[str], env: dict[str, str] | None = None,
                  timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(BUILD_ISO), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def test_build_iso_names_every_missing_tool(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname",):  # what the script needs before its tool check
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    (tmp_path / "media").mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "APPLIANCE_VENV": str(tmp_path / "nov")}
    proc = run_build_iso(["--bundle", str(tmp_path / "media"), "--out", str(tmp_path / "a.iso")],
                         env)
    assert proc.returncode == 1
    for needed in ("xorriso", "sha256sum", "venv"):
        assert needed in proc.stderr, proc.stderr
    assert not (tmp_path / "a.iso").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--out is required"),
        (["--out", "x.iso"], "--recipe RECIPE --key KEY, or --bundle DIR"),
        (["--bundle", "/nonexistent", "--out", "x.iso"], "does not exist"),
        (["--recipe", "r.yaml", "--bundle", ".", "--out", "x.iso"], "not both"),
        (["--recipe", str(REPO / "bundles" / "default.yaml"), "--out", "x.iso"], "--key"),
        (["--bundle", ".", "--out", "x.iso", "--volid", "bad id"], "--volid"),
        (["--bundle", ".", "--out", "x.iso", "--binary", "/nonexistent"], "not an executable"),
        (["--frobnicate"], "unknown argument"),
    ],
)
def test_build_iso_bad_arguments(args: list[str], message: str) -> None:
    proc = run_build_iso(args)
    assert proc.returncode == 1
    assert message in proc.stderr


# -- the binary and the image (slow) ----------------------------------------------------------


@pytest.fixture(scope="session")
def appliance_binary() -> Path:
    """dist/appliance, built once per session (or reused when its inputs are unchanged)."""
    proc = subprocess.run([sys.executable, str(BUILD_BINARY)], capture_output=True, text=True,
                          timeout=2400, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    binary = Path(proc.stdout.strip().splitlines()[-1])
    assert binary.is_file() and os.access(binary, os.X_OK)
    return binary


class Site:
    """Keys, a trust root and a bundle of the tiny model, made with the venv's CLI."""

    def __init__(self, base: Path, tiny_gguf: Path) -> None:
        self.base = base
        keys = base / "keys"
        for name in ("root", "pub"):
            assert main(["keys", "generate", name, "--out", str(keys), "--unencrypted"]) == 0
        self.root = base / "root-1.yaml"
        assert main(["trust", "init", "--root-key", str(keys / "root.pub"), "--root-threshold",
                     "1", "--publisher-key", str(keys / "pub.pub"), "--publisher-threshold", "1",
                     "--sign-with", str(keys / "root.key"), "--out", str(self.root)]) == 0
        self.key = keys / "pub.key"
        shutil.copy(tiny_gguf, base / "tiny.gguf")
        self.recipe = base / "recipe.yaml"
        self.recipe.write_text(
            "channel: site-models\nsequence: 1\nexpires_days: 30\nmodels:\n"
            "  - name: tiny\n    version: q8\n    license: apache-2.0\n"
            "    files:\n      - path: tiny.gguf\n"
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Site:
    return Site(tmp_path_factory.mktemp("site"), tiny_gguf)


def build_image(args: Sequence[str], out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    proc = run_build_iso([*args, "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def image(site: Site, appliance_binary: Path) -> Path:
    """An image built from the recipe: build_iso.sh runs `appliance bundle build` itself."""
    out = site.base / "appliance.iso"
    proc = build_image(["--recipe", str(site.recipe), "--key", str(site.key),
                        "--trust", str(site.root)], out)
    assert re.search(r"image .*appliance\.iso: \d+ bytes .* built in \d+\.\d s", proc.stdout)
    return out


@pytest.fixture(scope="module")
def extracted(image: Path, site: Site) -> Path:
    return extract_iso(image, site.base / "extracted")


def clean_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": CLEAN_PATH, "HOME": str(home)}


def run_clean(binary: Path, args: Sequence[str], home: Path, timeout: float = 300
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True,
                          env=clean_env(home), cwd=home, timeout=timeout, check=False)


@pytest.mark.slow
def test_binary_runs_in_clean_env(appliance_binary: Path, tmp_path: Path) -> None:
    proc = run_clean(appliance_binary, ["--version"], tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "appliance 0.1.0"
    # doctor runs llama.cpp in a child started as `sys.executable -m appliance.doctor_child`.
    proc = run_clean(appliance_binary, ["--store", str(tmp_path / "store"), "doctor", "--json"],
                     tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert checks["python"]["detail"].endswith(f"({appliance_binary})")  # no Python but itself
    assert checks["libraries"]["status"] == "ok", checks["libraries"]
    assert checks["llama.cpp build"]["status"] == "ok"
    assert "AMX" not in checks["llama.cpp build"]["detail"].split(":", 1)[1]
    assert checks["llama.cpp generate"]["status"] == "ok", checks["llama.cpp generate"]


@pytest.mark.slow
def test_image_layout_and_checksums(image: Path, extracted: Path, site: Site,
                                    appliance_binary: Path) -> None:
    top = {p.name for p in extracted.iterdir()}
    assert top == IMAGE_TOP | {"bundle"}
    assert (extracted / "appliance").read_bytes() == appliance_binary.read_bytes()
    assert os.access(extracted / "appliance", os.X_OK)
    assert (extracted / "root.yaml").read_bytes() == site.root.read_bytes()
    assert (extracted / "bundle" / "manifest.yaml").is_file()
    assert "@VERSION@" not in (extracted / "OPERATOR.md").read_text()
    # The operator's check with coreutils only, and ours on the image file.
    sums = subprocess.run(["sha256sum", "--strict", "-c", CHECKSUMS_NAME], cwd=extracted,
                          env={"PATH": CLEAN_PATH}, capture_output=True, text=True, check=False)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    listed = parse_checksums((extracted / CHECKSUMS_NAME).read_bytes())
    on_disk = {p.relative_to(extracted).as_posix() for p in extracted.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {CHECKSUMS_NAME}
    assert verify_image(image).files == len(listed)


@pytest.mark.slow
def test_clean_env_operator_flow(image: Path, extracted: Path, tmp_path: Path) -> None:
    binary = extracted / "appliance"
    home = tmp_path / "home"
    store = ["--store", str(tmp_path / "store")]

    def ok(*args: str) -> str:
        proc = run_clean(binary, args, home)
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    assert ok("--version").strip() == "appliance 0.1.0"
    assert "match SHA256SUMS" in ok("iso", "verify", str(image), "--quiet")
    fingerprint = re.search(r"^\s+([0-9a-f]{4}(?:-[0-9a-f]{4}){7})\s*$",
                            (extracted / "ROOT-FINGERPRINT.txt").read_text(), re.M)
    assert fingerprint is not None
    assert ok("trust", "fingerprint", str(extracted / "root.yaml")).strip() == fingerprint[1]
    ok(*store, "trust", "install", str(extracted / "root.yaml"), "--fingerprint", fingerprint[1])
    ok(*store, "bundle", "verify", str(extracted / "bundle"))
    ok(*store, "import", str(extracted / "bundle"))
    models = json.loads(ok(*store, "models", "list", "--json"))
    assert [m["name"] for m in models] == ["tiny"]

    with served(binary, [*store, "serve", "--listen", "127.0.0.1:0", "--threads", "1",
                         "--ctx", "256"], home) as url:
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] > 0
        assert isinstance(body["choices"][0]["text"], str)


@contextlib.contextmanager
def served(binary: Path, args: Sequence[str], home: Path) -> Iterator[str]:
    """`appliance serve` as a background process; yields its URL once /health says 200."""
    log_path = home / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(binary), *args], env=clean_env(home), cwd=home,
                                stdout=log, stderr=subprocess.STDOUT)

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    try:
        yield _wait_served(proc, log_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"serve ignored SIGTERM: {log_text()}") from None


def _wait_served(proc: subprocess.Popen[bytes], log_text: Callable[[], str]) -> str:
    deadline = time.monotonic() + 180
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {log_text()}")
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", log_text())
        if match:
            url = match[1]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"serve never became healthy ({url}): {log_text()}")


@pytest.fixture(scope="module")
def media(site: Site) -> Path:
    out = site.base / "media"
    assert main(["bundle", "build", str(site.recipe), "--key", str(site.key), "--trust",
                 str(site.root), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_reproducible_from_the_same_bundle(media: Path, site: Site, tmp_path: Path,
                                           appliance_binary: Path) -> None:
    # Same inputs from two places on disk, with other mtimes: same files, same bytes.
    copy = tmp_path / "elsewhere" / "media"
    shutil.copytree(media, copy)
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    # One binary for both builds, whatever else rebuilds dist/ meanwhile.
    binary = tmp_path / "appliance"
    shutil.copy2(appliance_binary, binary)
    first = tmp_path / "one.iso"
    second = tmp_path / "two" / "two.iso"
    second.parent.mkdir()
    build_image(["--bundle", str(media), "--trust", str(site.root), "--binary", str(binary)],
                first)
    build_image(["--bundle", str(copy), "--trust", str(site.root), "--binary", str(binary)],
                second)
    listing = [(f.path, f.size) for f in list_image(first)]
    assert listing == [(f.path, f.size) for f in list_image(second)]
    assert {p for p, _ in listing} >= IMAGE_TOP
    assert verify_image(first).checksums_sha256 == verify_image(second).checksums_sha256
    assert sha256(first.read_bytes()) == sha256(second.read_bytes())


@pytest.mark.slow
def test_default_trust_root_comes_from_the_bundle(media: Path, site: Site, tmp_path: Path,
                                                  appliance_binary: Path) -> None:
    out = tmp_path / "default-root.iso"
    build_image(["--bundle", str(media), "--binary", str(appliance_binary)], out)
    extracted = extract_iso(out, tmp_path / "x")
    assert (extracted / "root.yaml").read_bytes() == site.root.read_bytes()


@pytest.mark.slow
def test_iso_verify_catches_a_flipped_byte_in_the_image(image: Path, tmp_path: Path,
                                                        appliance_binary: Path) -> None:
    damaged = tmp_path / "damaged.iso"
    shutil.copyfile(image, damaged)
    pack = next(f for f in list_image(damaged) if f.path.startswith("bundle/packs/"))
    flip_byte(damaged, pack.extents[0].lba * SECTOR + pack.size // 2)
    with pytest.raises(IntegrityError) as caught:
        verify_image(damaged)
    assert caught.value.file == pack.path
    proc = run_clean(appliance_binary, ["iso", "verify", str(damaged), "--quiet"],
                     tmp_path / "home")
    assert proc.returncode == 2
    assert f"IntegrityError: {pack.path}: checksum differs" in proc.stderr
