"""``appliance doctor``: can this host import, store and serve models?

Owns the checks and their result model. Each check returns ``Check(name, status, essential,
detail)``; the doctor passes when every essential check is ``ok`` or ``warn``. llama.cpp is
exercised only in a child process (``appliance.doctor_child``) on a tiny model written at run
time, so a native crash (SIGSEGV in an AMX kernel, SIGILL from a ``-march=native`` build)
becomes a finding that names the signal instead of killing the doctor.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from appliance.errors import ApplianceError

Status = Literal["ok", "warn", "fail"]

MIN_PYTHON = (3, 11)
# import name -> distribution name, for the version when the module has no __version__.
LIBRARIES: dict[str, str] = {
    "blake3": "blake3",
    "zstandard": "zstandard",
    "cryptography": "cryptography",
    "yaml": "PyYAML",
    "gguf": "gguf",
    "llama_cpp": "llama_cpp_python",
    "textual": "textual",
    "rich": "rich",
    "httpx": "httpx",
    "zeroconf": "zeroconf",
    "starlette": "starlette",
    "uvicorn": "uvicorn",
}
# Imported only in the child: loading llama.cpp's native library can itself SIGILL.
CHILD_ONLY = frozenset({"llama_cpp"})
REQUIRED_CPU_FLAGS = ("avx", "avx2", "fma", "f16c")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
# llama.cpp system-info feature -> /proc/cpuinfo flag the CPU needs to run that code.
BUILD_FEATURE_FLAGS: dict[str, str] = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "AVX_VNNI": "avx_vnni",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}
AMX_BUILD_FEATURES = frozenset({"AMX", "AMX_INT8", "AMX_BF16"})
LOW_DISK_BYTES = 1 << 30
DEFAULT_CHILD_TIMEOUT = 120.0
PORTABLE_HINT = "rebuild llama-cpp-python portable with scripts/setup.sh (GGML_NATIVE=OFF)"


@dataclass(frozen=True)
class Check:
    """One finding. ``essential`` checks decide the doctor's exit code."""

    name: str
    status: Status
    essential: bool
    detail: str

    @property
    def blocking(self) -> bool:
        return self.essential and self.status == "fail"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def failed_essentials(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.blocking]


# -- python and libraries ---------------------------------------------------------------


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(map(str, version))
    if version[:2] >= MIN_PYTHON:
        return Check("python", "ok", True, f"Python {text} ({sys.executable})")
    need = ".".join(map(str, MIN_PYTHON))
    return Check("python", "fail", True, f"Python {text} is too old; appliance needs >= {need}")


def _library_version(module: str, dist: str) -> str:
    if module not in CHILD_ONLY:
        imported = importlib.import_module(module)
        version = getattr(imported, "__version__", None)
        if isinstance(version, str):
            return version
    return importlib.metadata.version(dist)


def check_libraries(libraries: dict[str, str] = LIBRARIES) -> Check:
    found: list[str] = []
    missing: list[str] = []
    for module, dist in libraries.items():
        try:
            found.append(f"{module} {_library_version(module, dist)}")
        except (ImportError, importlib.metadata.PackageNotFoundError) as e:
            missing.append(f"{module} ({type(e).__name__}: {e})")
    if missing:
        return Check(
            "libraries",
            "fail",
            True,
            f"missing: {'; '.join(missing)}. Install with: pip install -e . "
            f"(found: {', '.join(found) or 'none'})",
        )
    return Check("libraries", "ok", True, ", ".join(found))


# -- CPU and llama.cpp build ------------------------------------------------------------


def parse_cpu_flags(cpuinfo: str) -> set[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """CPU flags, or None when the platform has no /proc/cpuinfo."""
    try:
        return parse_cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return None


def check_cpu(flags: set[str] | None) -> list[Check]:
    if not flags:
        return [
            Check("cpu features", "warn", False, "cannot read CPU flags (no /proc/cpuinfo)"),
        ]
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    present = [f for f in REQUIRED_CPU_FLAGS if f in flags]
    if missing:
        features = Check(
            "cpu features",
            "fail",
            True,
            f"missing {', '.join(missing)}: the portable llama.cpp build needs "
            f"{', '.join(REQUIRED_CPU_FLAGS)} and would die with SIGILL",
        )
    else:
        features = Check("cpu features", "ok", True, ", ".join(present))
    amx = [f for f in AMX_FLAGS if f in flags]
    amx_check = Check(
        "cpu amx",
        "ok",
        False,
        (
            f"present ({', '.join(amx)}): a native llama.cpp build would enable AMX, "
            "which crashes on first decode in VMs (llama.cpp #20824)"
        )
        if amx
        else "absent",
    )
    return [features, amx_check]


def parse_system_info(info: str) -> set[str]:
    """Features llama.cpp reports as compiled in (``NAME = 1``)."""
    return set(re.findall(r"\b([A-Z][A-Z0-9_]*) = 1\b", info))


def check_build(system_info: str | None, flags: set[str] | None) -> Check:
    """Is the llama.cpp build portable, and can this CPU run everything compiled in?"""
    if system_info is None:
        return Check("llama.cpp build", "warn", True, "no system info: the child died first")
    enabled = parse_system_info(system_info)
    summary = " ".join(sorted(enabled)) or system_info.strip()[:200]
    amx = sorted(enabled & AMX_BUILD_FEATURES)
    unsupported = sorted(
        feature
        for feature, flag in BUILD_FEATURE_FLAGS.items()
        if feature in enabled and flags and flag not in flags
    )
    if unsupported:
        return Check(
            "llama.cpp build",
            "fail",
            True,
            f"compiled for {', '.join(unsupported)} which this CPU lacks (SIGILL risk); "
            f"{PORTABLE_HINT}",
        )
    if amx:
        cpu_has_amx = flags is not None and any(f in flags for f in AMX_FLAGS)
        return Check(
            "llama.cpp build",
            "fail" if cpu_has_amx else "warn",
            True,
            f"AMX enabled ({', '.join(amx)}): crashes in ggml_backend_amx_mul_mat on first "
            f"decode inside VMs (llama.cpp #20824); {PORTABLE_HINT}",
        )
    if any(f.startswith("AVX512") for f in enabled):
        return Check(
            "llama.cpp build",
            "warn",
            True,
            f"looks native-only (AVX512 compiled in): a copy will SIGILL on older hosts; "
            f"{PORTABLE_HINT}. Features: {summary}",
        )
    return Check("llama.cpp build", "ok", True, f"portable: {summary}")


# -- llama.cpp in a child ---------------------------------------------------------------


@dataclass(frozen=True)
class ChildResult:
    """What the llama.cpp child said and how it ended."""

    returncode: int | None  # None: timed out and killed
    records: list[dict[str, Any]]
    stderr: str

    def first(self, key: str) -> Any:
        return next((r[key] for r in self.records if key in r), None)


def run_child(model: Path, *, timeout: float = DEFAULT_CHILD_TIMEOUT) -> ChildResult:
    """Run ``python -m appliance.doctor_child MODEL`` and collect its JSON lines."""
    env = dict(os.environ)
    # The child must import this same appliance, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "appliance.doctor_child", str(model)],
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        returncode: int | None = proc.returncode
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode = None
        stdout, stderr = e.stdout or b"", e.stderr or b""
    records: list[dict[str, Any]] = []
    for line in stdout.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return ChildResult(returncode, records, stderr.decode(errors="replace"))


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def check_generate(result: ChildResult, timeout: float) -> Check:
    name = "llama.cpp generate"
    tail = " | ".join(result.stderr.strip().splitlines()[-3:])
    if result.returncode is None:
        return Check(name, "fail", True, f"the llama.cpp child hung: killed after {timeout:g} s")
    if result.returncode < 0:
        sig = signal_name(result.returncode)
        detail = (
            f"llama.cpp crashed with {sig} (signal {-result.returncode}) while loading or "
            f"generating from a tiny model; {PORTABLE_HINT}"
        )
        return Check(name, "fail", True, detail + (f"; stderr: {tail}" if tail else ""))
    error = result.first("error")
    tokens = result.first("tokens")
    if result.returncode != 0 or error is not None or not isinstance(tokens, int):
        why = error or tail or f"exit status {result.returncode}, no result"
        return Check(name, "fail", True, f"llama.cpp could not generate: {why}")
    if tokens < 1:
        return Check(name, "fail", True, "llama.cpp loaded the tiny model but generated no token")
    version = result.first("llama_cpp_version")
    return Check(
        name,
        "ok",
        True,
        f"llama-cpp-python {version}: tiny model generated {tokens} tokens in "
        f"{result.first('seconds')} s (child process)",
    )


def check_llama(
    flags: set[str] | None, *, timeout: float = DEFAULT_CHILD_TIMEOUT
) -> list[Check]:
    """Write a tiny model, run the child on it, judge the build and the generation."""
    with tempfile.TemporaryDirectory(prefix="appliance-doctor-") as tmp:
        try:
            from appliance.tiny_model import write_tiny_llama

            model = write_tiny_llama(Path(tmp) / "doctor-tiny.gguf")
        except (ImportError, OSError) as e:
            detail = f"cannot write the tiny test model: {type(e).__name__}: {e}"
            return [Check("llama.cpp generate", "fail", True, detail)]
        result = run_child(model, timeout=timeout)
    return [check_build(result.first("system_info"), flags), check_generate(result, timeout)]


# -- store ------------------------------------------------------------------------------


def check_store_writable(store: Path) -> Check:
    """Create the store dir, write + fsync + delete a probe file."""
    name = "store writable"
    probe = store / f".doctor-probe-{os.getpid()}"
    try:
        store.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"appliance doctor probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        return Check(name, "fail", True, f"cannot write in {store}: {e.strerror or e}")
    return Check(name, "ok", True, str(store))


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_disk(store: Path, *, low: int = LOW_DISK_BYTES) -> Check:
    name = "free disk"
    where = _existing_ancestor(store)
    try:
        usage = shutil.disk_usage(where)
    except OSError as e:
        return Check(name, "warn", False, f"cannot read free space at {where}: {e}")
    free = f"{usage.free / (1 << 30):.1f} GiB free of {usage.total / (1 << 30):.1f} GiB at {where}"
    if usage.free < low:
        return Check(name, "warn", False, f"only {free}: model imports will run out of space")
    return Check(name, "ok", False, free)


def check_trust_root(store: Path) -> Check:
    """A missing trust root is a warning: the host can still serve what it holds."""
    from appliance.store import trust_state

    name = "trust root"
    try:
        installed = trust_state.installed_versions(store)
    except ApplianceError as e:  # a damaged index is a StoreError from the store API
        return Check(name, "warn", False, f"cannot read the store index: {e}")
    if not installed:
        return Check(
            name,
            "warn",
            False,
            "none installed: bundles cannot be verified; install one with appliance trust install",
        )
    version, fingerprint, _ = installed[-1]
    return Check(name, "ok", False, f"version {version}, fingerprint {fingerprint}")


# -- the serving engine -----------------------------------------------------------------


def check_serving_engine() -> Check:
    """llama-server (the serving engine): built? which backend, devices and free VRAM."""
    from appliance.serve.engine import find_binary, gpu_devices

    name = "serving engine"
    binary = find_binary()
    if binary is None:
        return Check(name, "warn", False, "llama-server is not built (scripts/"
                     "build_llama_server.sh): appliance serve falls back to llama-cpp-python, "
                     "one request at a time per model, no tools or JSON schemas")
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(name, "fail", False, f"{binary} does not run: {e}")
    version = next((line for line in (out.stdout + out.stderr).splitlines()
                    if line.startswith("version")), "version unknown")
    devices = gpu_devices(binary)
    backend = f"GPU: {'; '.join(devices)}" if devices else "CPU only (no GPU backend or device)"
    return Check(name, "ok", False, f"llama-server {version}; {backend}")


# -- all together -----------------------------------------------------------------------


def run_checks(
    store: Path,
    *,
    timeout: float = DEFAULT_CHILD_TIMEOUT,
    progress: Callable[[Check], None] | None = None,
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> list[Check]:
    """Run every check in order; ``progress`` is called with each result as it lands."""
    checks: list[Check] = []

    def add(*new: Check) -> None:
        for check in new:
            checks.append(check)
            if progress is not None:
                progress(check)

    flags = read_cpu_flags(cpuinfo)
    add(check_python())
    add(check_libraries())
    add(*check_cpu(flags))
    add(*check_llama(flags, timeout=timeout))
    add(check_serving_engine())
    writable = check_store_writable(store)
    add(writable)
    add(check_disk(store))
    if writable.status == "ok":
        add(check_trust_root(store))
    else:
        add(Check("trust root", "warn", False, "not checked: the store is not writable"))
    return checks
