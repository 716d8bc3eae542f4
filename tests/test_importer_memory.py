"""Memory stays flat: importing a 2 GB model peaks well under 300 MB RSS (issue 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_helpers import build, sparse_file, write_recipe

MIB = 1 << 20

_RSS_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from bundle_helpers import NOW
from trust_helpers import trusted_store
from appliance.importer import import_media
from appliance.store.records import get_model
store = trusted_store(Path({store!r}))
result = import_media(store, [Path({media!r})], now=NOW)
model = get_model(store, "acme/tiny")
# VmHWM, not ru_maxrss: on Linux ru_maxrss carries over the forking pytest process's peak.
peak = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"kib": int(peak),
                  "complete": result.complete, "media_bytes": result.media_bytes,
                  "size": model.size}}))
"""


@pytest.mark.slow
def test_memory_stays_flat_importing_a_multi_gb_model(tmp_path: Path) -> None:
    size = 2 * 1024 * MIB + 4321
    (tmp_path / "models").mkdir()
    sparse_file(tmp_path / "models" / "big.bin", size)
    build(tmp_path, recipe=write_recipe(tmp_path, files=("big.bin",)))
    script = _RSS_SCRIPT.format(
        tests=str(Path(__file__).parent),
        store=str(tmp_path / "store"),
        media=str(tmp_path / "media"),
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=900
    )
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["complete"] and facts["size"] == size and facts["media_bytes"] == size
    assert facts["kib"] < 300 * 1024, facts
