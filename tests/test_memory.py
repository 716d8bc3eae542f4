"""glibc's mmap threshold is pinned so chunk buffers are returned to the system on free."""

from __future__ import annotations

import subprocess
import sys


def test_pin_mmap_threshold_in_a_fresh_process() -> None:
    code = (
        "from appliance.memory import pin_mmap_threshold as p\n"
        "assert p() is True, 'mallopt(M_MMAP_THRESHOLD) refused'\n"
        "assert p() is True  # cached: once per process\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
