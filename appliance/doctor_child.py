"""The crash-isolated half of ``appliance doctor``: load a GGUF in llama.cpp and generate.

Run as ``python -m appliance.doctor_child MODEL.gguf``. It prints one JSON object per line
on stdout, flushed at once, so the parent keeps what was said before a native crash:

    {"system_info": "...", "llama_cpp_version": "..."}     before any model is loaded
    {"tokens": 8, "seconds": 0.03, "text": "..."}          after generating
    {"error": "..."}                                       a Python-level failure (exit 1)

A SIGSEGV, SIGILL or abort inside llama.cpp kills only this process; the doctor reports the
signal.

Test hook: when ``APPLIANCE_DOCTOR_CHILD_CRASH`` names a signal (e.g. ``SIGSEGV``), this entry
point kills itself with it after printing the system info and before loading the model. Only
this module reads the variable; it exists so tests can prove the doctor survives and names a
native crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

CRASH_ENV = "APPLIANCE_DOCTOR_CHILD_CRASH"
MAX_TOKENS = 8
N_CTX = 256


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _crash_if_asked() -> None:
    name = os.environ.get(CRASH_ENV)
    if not name:
        return
    signum = getattr(signal, name, None)
    if not isinstance(signum, signal.Signals):
        _emit({"error": f"{CRASH_ENV}={name!r} is not a signal name"})
        raise SystemExit(1)
    # Make sure the default action (die, maybe core) runs, not a Python handler;
    # SIGKILL and SIGSTOP cannot be caught and refuse any handler change.
    with contextlib.suppress(OSError):
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(5)  # a signal that does not kill (e.g. SIGCHLD) falls through to a clean run


def generate(model_path: str) -> dict[str, Any]:
    """Load ``model_path`` and greedily generate ``MAX_TOKENS`` tokens, end-of-text banned."""
    import llama_cpp
    import numpy as np

    start = time.monotonic()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=N_CTX, seed=0, verbose=False)
    eos = llm.token_eos()

    # Random-weight models may pick end-of-text at once; the doctor wants tokens decoded.
    def ban_eos(_ids: Any, scores: Any) -> Any:
        scores[eos] = -np.inf
        return scores

    out = llm.create_completion(
        "hello",
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        logits_processor=llama_cpp.LogitsProcessorList([ban_eos]),
    )
    usage = out["usage"]  # type: ignore[index]
    return {
        "tokens": int(usage["completion_tokens"]),
        "seconds": round(time.monotonic() - start, 3),
        "text": out["choices"][0]["text"],  # type: ignore[index]
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        _emit({"error": "usage: python -m appliance.doctor_child MODEL.gguf"})
        return 1
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info()
        text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
        version = getattr(llama_cpp, "__version__", "unknown")
        _emit({"system_info": text, "llama_cpp_version": version})
    except Exception as e:  # report anything Python-level; the parent decides what it means
        _emit({"error": f"cannot import llama_cpp: {type(e).__name__}: {e}"})
        return 1
    _crash_if_asked()
    try:
        _emit(generate(args[0]))
    except Exception as e:
        _emit({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
