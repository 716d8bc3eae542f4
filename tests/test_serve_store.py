"""Serving from the store: the resolver's checks and ``appliance serve`` as a real process.

The store is real (SQLite index, staged and published files, audit log); the tiny GGUF is
written into it with the store's own import path (``store_helpers.write_model``).
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path

import blake3
import httpx
import openai
import pytest
from serve_helpers import appliance_serve, wait_health
from store_helpers import model_entry, write_model

from appliance.cli.main import main
from appliance.errors import EXIT_ERROR, EXIT_USAGE, IntegrityError, ModelNotFoundError
from appliance.serve.store_resolver import store_resolver
from appliance.store import audit
from appliance.store.scrub import verify_store
from appliance.store.store import Store

KEY = "cli-test-key-0123456789"
CHUNK = 64 * 1024


@pytest.fixture()
def store(tmp_path: Path, tiny_gguf: Path) -> Path:
    store_dir = tmp_path / "store"
    data = tiny_gguf.read_bytes()
    with Store(store_dir) as s:
        write_model(s, model_entry("tiny", "1", {"tiny.gguf": data}, CHUNK), {"tiny.gguf": data})
    return store_dir


def published(store_dir: Path) -> Path:
    return store_resolver(store_dir)("tiny").path


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)  # published files are read-only
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_resolver_gives_the_published_file_and_its_identity(store: Path,
                                                            tiny_gguf: Path) -> None:
    model = store_resolver(store)("tiny")
    assert model.name == "tiny" and model.path.is_file() and model.path != tiny_gguf
    assert model.size == tiny_gguf.stat().st_size
    assert model.identity == blake3.blake3(tiny_gguf.read_bytes()).hexdigest()
    assert store_resolver(store, verify="full")("tiny:1") == replace(model, name="tiny:1")
    with pytest.raises(ModelNotFoundError):
        store_resolver(store)("absent")


def test_quick_check_catches_a_changed_header_full_check_any_byte(store: Path) -> None:
    path = published(store)
    size = path.stat().st_size
    flip_byte(path, size - 10)  # tensor data, far from the header chunk
    store_resolver(store, verify="quick")("tiny")
    with pytest.raises(IntegrityError) as full:
        store_resolver(store, verify="full")("tiny")
    assert full.value.chunk is not None and full.value.offset == (size - 10) // CHUNK * CHUNK
    flip_byte(path, 100)  # GGUF metadata
    with pytest.raises(IntegrityError) as quick:
        store_resolver(store, verify="quick")("tiny")
    assert quick.value.offset == 0 and "header" in str(quick.value)


def test_quarantined_or_resized_models_are_refused(store: Path) -> None:
    path = published(store)
    path.chmod(0o644)
    with path.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError):
        store_resolver(store)("tiny")
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 1)
    flip_byte(path, 5000)
    report = verify_store(store)  # quarantines the file: it must never be served again
    assert not report.ok
    with pytest.raises(IntegrityError) as refused:
        store_resolver(store)("tiny")
    assert "quarantined" in str(refused.value)


def test_a_model_still_importing_is_not_servable(tmp_path: Path, tiny_gguf: Path) -> None:
    store_dir = tmp_path / "store"
    data = tiny_gguf.read_bytes()
    with Store(store_dir) as s:
        write_model(s, model_entry("tiny", "1", {"tiny.gguf": data}, CHUNK),
                    {"tiny.gguf": data}, limit_chunks=2)
    with pytest.raises(ModelNotFoundError):
        store_resolver(store_dir)("tiny")


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--model", "absent"], EXIT_ERROR),
        (["--listen", "nowhere"], EXIT_USAGE),
        (["--threads", "0"], EXIT_USAGE),
        (["--api-key-file", "/nonexistent/keys"], EXIT_USAGE),
    ],
)
def test_serve_command_refuses_bad_arguments(store: Path, extra: list[str], code: int) -> None:
    assert main(["--store", str(store), "serve", "--listen", "127.0.0.1:0", *extra]) == code


def test_serve_command_needs_a_verified_model(tmp_path: Path) -> None:
    assert main(["--store", str(tmp_path / "empty"), "serve"]) == EXIT_USAGE


def test_appliance_serve_answers_from_the_store(store: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# test\n{KEY}\n")
    with appliance_serve(store, "--model", "tiny", "--api-key-file", str(keys),
                         "--preload") as served:
        health = wait_health(served.url)
        worker_pid = health["models"]["tiny"]["pid"]
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0,
                               timeout=120)
        model = client.models.retrieve("tiny").model_dump()
        assert model["identity"] == store_resolver(store)("tiny").identity
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        assert reply.choices[0].finish_reason in ("length", "stop")
        chunks = list(client.completions.create(model="tiny", prompt="once", max_tokens=4,
                                                stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert httpx.get(f"{served.url}/metrics").status_code == 401
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells it.
    assert served.proc.returncode in (0, -signal.SIGTERM)
    assert any("workers of tiny shut down" in line for line in served.log)
    assert not Path(f"/proc/{worker_pid}").exists()  # the worker went with the server
    starts = [r for r in audit.records(store) if r.kind == "serve-start"]
    assert len(starts) == 1 and starts[0].details["models"] == ["tiny"]
    assert starts[0].details["listen"] == served.url.removeprefix("http://")


def test_appliance_serve_refuses_a_tampered_model_and_audits_it(store: Path) -> None:
    path = published(store)
    flip_byte(path, path.stat().st_size - 10)
    with appliance_serve(store, "--verify-on-load", "full", "--preload") as served:
        deadline = time.monotonic() + 60
        while httpx.get(f"{served.url}/health").json()["models"]["tiny"]["state"] != "refused":
            assert time.monotonic() < deadline, "never refused"
            time.sleep(0.05)
        answer = httpx.post(f"{served.url}/v1/completions", timeout=30,
                            json={"model": "tiny", "prompt": "x"})
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "model_refused"
        assert "IntegrityError" in answer.json()["error"]["message"]
    assert any("refused" in line and "tiny" in line for line in served.log)
    refusals = [r for r in audit.records(store) if r.kind == "refusal"]
    assert len(refusals) == 1
    assert refusals[0].details["model"] == "tiny"
    assert refusals[0].details["error"] == "IntegrityError"
    assert refusals[0].details["action"] == "serve-load"
    audit.verify(store)
