"""appliance doctor: real checks on this host, a real llama.cpp child, real crashes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from appliance import doctor
from appliance.cli.main import main
from appliance.doctor import Check, ChildResult
from appliance.doctor_child import CRASH_ENV
from appliance.errors import EXIT_ERROR, EXIT_OK
from appliance.store.db import connect

EXPECTED_NAMES = [
    "python",
    "libraries",
    "cpu features",
    "cpu amx",
    "llama.cpp build",
    "llama.cpp generate",
    "serving engine",
    "store writable",
    "free disk",
    "trust root",
]


def _doctor_json(capsys: pytest.CaptureFixture[str], store: Path) -> tuple[int, list[dict]]:
    code = main(["--store", str(store), "doctor", "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def _by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


@pytest.mark.slow
def test_doctor_passes_here(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, checks = _doctor_json(capsys, tmp_path / "store")
    assert code == EXIT_OK, checks
    assert [c["name"] for c in checks] == EXPECTED_NAMES
    for check in checks:
        assert set(check) == {"name", "status", "essential", "detail"}
        assert check["status"] in {"ok", "warn", "fail"}
        assert isinstance(check["essential"], bool)
        assert isinstance(check["detail"], str) and check["detail"]
    by_name = _by_name(checks)
    assert by_name["llama.cpp generate"]["status"] == "ok"
    assert "generated 8 tokens" in by_name["llama.cpp generate"]["detail"]
    assert by_name["llama.cpp build"]["status"] == "ok"  # setup.sh builds portable
    assert by_name["store writable"]["status"] == "ok"
    # A fresh store has no trust root: a warning, not a failure.
    assert by_name["trust root"] == {
        "name": "trust root",
        "status": "warn",
        "essential": False,
        "detail": (
            "none installed: bundles cannot be verified; install one with appliance trust install"
        ),
    }
    assert (tmp_path / "store").is_dir()
    assert not list((tmp_path / "store").glob(".doctor-probe-*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGILL", "SIGABRT"])
def test_child_crash_is_a_finding(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    sig: str,
) -> None:
    monkeypatch.setenv(CRASH_ENV, sig)
    code, checks = _doctor_json(capsys, tmp_path / "store")
    assert code == EXIT_ERROR
    generate = _by_name(checks)["llama.cpp generate"]
    assert generate["status"] == "fail"
    assert generate["essential"] is True
    number = int(getattr(signal, sig))
    assert f"crashed with {sig} (signal {number})" in generate["detail"]
    # The child said what it was built with before it died, so the build is still judged.
    assert _by_name(checks)["llama.cpp build"]["status"] == "ok"
    # The rest of the doctor ran to the end.
    assert [c["name"] for c in checks] == EXPECTED_NAMES


def test_crash_table_and_error_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CRASH_ENV, "SIGSEGV")
    code = main(["--store", str(tmp_path / "store"), "doctor"])
    captured = capsys.readouterr()
    assert code == EXIT_ERROR
    assert "llama.cpp generate" in captured.out
    assert "SIGSEGV" in captured.out
    assert "DoctorError" in captured.err
    assert "llama.cpp generate" in captured.err


def test_hung_child_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CRASH_ENV, "SIGSTOP")
    _build, generate = doctor.check_llama({"avx", "avx2", "fma", "f16c"}, timeout=2.0)
    assert generate.status == "fail"
    assert "hung: killed after 2 s" in generate.detail


def test_store_under_a_regular_file_is_not_writable(tmp_path: Path) -> None:
    # We run as root, so chmod cannot make a directory unwritable; a file in the path can.
    blocker = tmp_path / "plain-file"
    blocker.write_bytes(b"not a directory")
    store = blocker / "store"
    check = doctor.check_store_writable(store)
    assert check.status == "fail" and check.essential
    assert str(store) in check.detail
    assert blocker.read_bytes() == b"not a directory"


def test_unwritable_store_fails_the_doctor(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_bytes(b"not a directory")
    code, checks = _doctor_json(capsys, blocker / "store")
    assert code == EXIT_ERROR
    by_name = _by_name(checks)
    assert by_name["store writable"]["status"] == "fail"
    assert by_name["trust root"]["status"] == "warn"
    assert "not checked" in by_name["trust root"]["detail"]


def test_installed_trust_root_is_reported(tmp_path: Path) -> None:
    conn = connect(tmp_path)
    conn.execute(
        "INSERT INTO trust_roots (version, fingerprint, body, installed_at) VALUES (?, ?, ?, ?)",
        (2, "ab12-cd34", b"root v2", "2025-01-01T00:00:00Z"),
    )
    conn.execute(
        "INSERT INTO trust_roots (version, fingerprint, body, installed_at) VALUES (?, ?, ?, ?)",
        (1, "ee99-ff00", b"root v1", "2024-01-01T00:00:00Z"),
    )
    conn.close()
    check = doctor.check_trust_root(tmp_path)
    assert check == Check("trust root", "ok", False, "version 2, fingerprint ab12-cd34")


def test_python_version_gate() -> None:
    assert doctor.check_python((3, 11, 0)).status == "ok"
    old = doctor.check_python((3, 10, 12))
    assert old.status == "fail" and old.essential
    assert "3.10.12" in old.detail


def test_missing_library_fails() -> None:
    check = doctor.check_libraries({"yaml": "PyYAML", "no_such_module_zz9": "no-such-dist-zz9"})
    assert check.status == "fail" and check.essential
    assert "no_such_module_zz9" in check.detail
    assert "yaml" in check.detail  # found ones are still listed


def test_cpu_flags_parse_and_judge() -> None:
    text = (
        "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma f16c amx_tile amx_int8\n"
        "\nprocessor\t: 1\n"
    )
    flags = doctor.parse_cpu_flags(text)
    assert {"avx2", "amx_int8"} <= flags
    features, amx = doctor.check_cpu(flags)
    assert features.status == "ok"
    assert amx.status == "ok" and "present" in amx.detail
    features, amx = doctor.check_cpu({"avx", "fma"})
    assert features.status == "fail" and features.essential
    assert "avx2" in features.detail and "f16c" in features.detail
    assert amx.detail == "absent"
    (unknown,) = doctor.check_cpu(None)
    assert unknown.status == "warn" and not unknown.essential


# What the portable build of setup.sh reports (llama_print_system_info).
PORTABLE_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
HOST = {"pni", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2"}


def test_build_portable_is_ok() -> None:
    check = doctor.check_build(PORTABLE_INFO, HOST)
    assert check.status == "ok"
    assert "AVX2" in check.detail


def test_build_with_amx_is_flagged() -> None:
    info = PORTABLE_INFO + "AVX512 = 1 | AMX_INT8 = 1 | "
    on_amx_host = doctor.check_build(info, HOST | {"avx512f", "amx_int8", "amx_tile"})
    assert on_amx_host.status == "fail" and on_amx_host.essential
    assert "AMX_INT8" in on_amx_host.detail and "#20824" in on_amx_host.detail


def test_build_for_features_the_cpu_lacks_fails() -> None:
    info = PORTABLE_INFO + "AVX512 = 1 | AVX512_VNNI = 1 | "
    check = doctor.check_build(info, HOST)
    assert check.status == "fail"
    assert "AVX512, AVX512_VNNI" in check.detail and "SIGILL" in check.detail
    native_here = doctor.check_build(info, HOST | {"avx512f", "avx512_vnni"})
    assert native_here.status == "warn" and "native-only" in native_here.detail


def test_generate_judgement_from_child_results() -> None:
    ok = ChildResult(0, [{"system_info": "x"}, {"tokens": 8, "seconds": 0.1}], "")
    assert doctor.check_generate(ok, 5).status == "ok"
    error = ChildResult(1, [{"error": "ValueError: Failed to load model from file"}], "")
    check = doctor.check_generate(error, 5)
    assert check.status == "fail" and "Failed to load model" in check.detail
    killed = ChildResult(-9, [], "oom\n")
    assert "SIGKILL (signal 9)" in doctor.check_generate(killed, 5).detail
    assert doctor.signal_name(-200) == "signal 200"


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and "examples:" in out and "child process" in out


def test_bad_timeout_is_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--store", str(tmp_path), "doctor", "--timeout", "0"]) == 1
    assert "UsageError" in capsys.readouterr().err
