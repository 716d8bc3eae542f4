"""Hostile input cost: what refusing media that lacks a valid signature threshold costs.

Input that is not authenticated may cost only a small, fixed amount of time and memory,
whatever its size (issue 14: under 1 s and 150 MB RSS for any unsigned volume set). Each
case below damages a real signed bundle the way an attacker would and runs the reader in a
fresh child process, so the peak RSS (``VmHWM``) is that case's alone; the time is from
``open_media`` to the refusal (interpreter start and imports excluded, reported apart as the
child's baseline RSS).

A benchmark module with ``costs(ctx) -> list[Cost]`` (instead of ``run``) is printed by
``bench/run.py`` as its own table: these are costs to keep low, not throughput to compare.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle.media import INDEX_NAME, MANIFEST_NAME, SIGNATURES_DIR, TRUST_DIR
from appliance.format import yamlsafe
from appliance.format.signing import DOMAIN_MANIFEST, DOMAIN_ROOT, key_id, public_bytes, sign
from appliance.format.trust import ROOT_FORMAT
from appliance.limits import DEFAULT_LIMITS, MiB
from bench.harness import BenchContext
from bench.signed_bundle import prepare

AIM_SECONDS = 1.0
AIM_PEAK_MB = 150.0
_CHILD_TIMEOUT = 60  # a hang (the FIFO case before the fix) fails the run instead of waiting

# Runs in the child: open the media, authenticate it (or parse it unverified, as `bundle
# inspect` does), print what it cost.
_CHILD = r"""
import json, sys, time
from datetime import datetime
from pathlib import Path

def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0

args = json.loads(sys.argv[1])
from appliance.bundle.reader import open_media
from appliance.errors import ApplianceError
from appliance.format.trust import parse_signed_root, verify_self_signed
now = datetime.fromisoformat(args["now"])
root = verify_self_signed(parse_signed_root(Path(args["root"]).read_bytes()), now)
base = hwm_kb()
start = time.perf_counter()
try:
    media = open_media([Path(args["media"])])
    if args["mode"] == "inspect":
        media.parse_unverified()
    else:
        media.authenticate(root, now)
    outcome = "accepted"
except ApplianceError as e:
    outcome = type(e).__name__
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "outcome": outcome, "peak_kb": hwm_kb(),
                  "base_kb": base}))
"""


@dataclass(frozen=True)
class Cost:
    case: str
    command: str  # what the child ran: "verify/import" (authenticate) or "inspect"
    outcome: str  # the error class it was refused with
    seconds: float
    peak_mb: float  # VmHWM of the child
    base_mb: float  # VmHWM of the child before the case (Python + appliance imported)

    @property
    def within_aim(self) -> bool:
        return self.seconds < AIM_SECONDS and self.peak_mb < AIM_PEAK_MB

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "within_aim": self.within_aim}


def _break_signatures(volume: Path) -> None:
    for path in (volume / SIGNATURES_DIR).iterdir():
        magic, key, encoded = path.read_text().split()
        raw = bytearray(base64.b64decode(encoded))
        raw[10] ^= 0x01
        path.write_text(f"{magic} {key} {base64.b64encode(bytes(raw)).decode()}\n")


def _huge_index(volume: Path) -> str:
    """The largest index the cap allows: entries that are all well formed (distinct digests,
    one-byte chunks tiling one pack), so a reader that parsed them before authenticating
    would build every one of them."""
    entries = (DEFAULT_LIMITS.max_volume_index_bytes - 88 - 32) // 49
    head = bytearray((volume / INDEX_NAME).read_bytes()[:88])
    struct.pack_into("<QQ", head, 24, entries, entries)  # entry count, total unique chunks
    struct.pack_into("<Q", head, 80, entries)  # the one pack's size
    entry = struct.Struct("<32sIQIB")
    body = bytes(head) + b"".join(
        entry.pack(i.to_bytes(32, "little"), 1, i, 1, 0) for i in range(entries)
    )
    (volume / INDEX_NAME).write_bytes(body + blake3.blake3(body).digest())
    _break_signatures(volume)
    return (f"unsigned index, {len(body) // MiB} MiB ({entries:,} well-formed entries), "
            "bad signature")


def _huge_manifest(volume: Path) -> str:
    size = DEFAULT_LIMITS.max_manifest_bytes
    line = b"padding: 0123456789abcdef0123456789abcdef0123456789abcdef01234567\n"
    (volume / MANIFEST_NAME).write_bytes(line * (size // len(line)))
    for path in (volume / SIGNATURES_DIR).iterdir():
        path.unlink()
    return f"manifest of {size // MiB} MiB, no signatures"


def _many_signatures(volume: Path) -> str:
    """The cap's worth of signatures: the publisher's own broken, the rest by unknown keys
    (valid signatures, so each costs a parse, but no verification: not a root key)."""
    _break_signatures(volume)
    data = (volume / MANIFEST_NAME).read_bytes()
    count = len(list((volume / SIGNATURES_DIR).iterdir()))
    while count < DEFAULT_LIMITS.max_signatures:
        sig = sign(Ed25519PrivateKey.generate(), DOMAIN_MANIFEST, data)
        (volume / SIGNATURES_DIR / f"{sig.key_id}.sig").write_bytes(sig.to_bytes())
        count += 1
    return f"{count} signature files, none valid"


def _forged_roots(volume: Path) -> str:
    """Carried roots v2..v33, each a well-formed 1 MiB root (256 keys, 60 patterns per
    publisher key) signed by keys nobody trusts. Parsing one costs about a second, so a
    reader that parsed them before checking who signed them would spend half a minute."""
    keys = [Ed25519PrivateKey.generate() for _ in range(256)]
    ids = [key_id(public_bytes(k)) for k in keys]
    patterns = [f"org-{j:02d}/model-family-{j:02d}-*-quantized-variant-{j:02d}" for j in range(60)]
    body = yamlsafe.dump({
        "format": ROOT_FORMAT, "version": 2, "created": "2026-01-01T00:00:00Z",
        "expires": "2099-01-01T00:00:00Z",
        "keys": {kid: {"name": f"key-{i}", "public": public_bytes(k).hex()}
                 for i, (kid, k) in enumerate(zip(ids, keys, strict=True))},
        "roles": {"root": {"threshold": 1, "keys": sorted(ids[:4])},
                  "publisher": {"threshold": 1, "keys": sorted(ids[4:]),
                                "models": {kid: patterns for kid in ids[4:]}}},
    })
    for version in range(2, 34):
        text = body.replace(b"version: 2\n", f"version: {version}\n".encode())
        sig = sign(keys[0], DOMAIN_ROOT, text).to_bytes().decode().strip()
        lines = ["format: appliance-signed-root/1", "signed: |",
                 *(f"  {line}" for line in text.decode().rstrip("\n").split("\n")),
                 "signatures:", f"- {sig}"]
        (volume / TRUST_DIR / f"root-{version}.yaml").write_text("\n".join(lines) + "\n")
    size = (volume / TRUST_DIR / "root-2.yaml").stat().st_size
    return f"32 carried roots of {size / MiB:.1f} MiB each, signed by keys nobody trusts"


def _deep_trust_root(volume: Path) -> str:
    size = DEFAULT_LIMITS.max_trust_root_bytes
    (volume / TRUST_DIR / "root-2.yaml").write_bytes(b"[" * size)
    return f"carried trust root of {size // MiB} MiB nested '[' (deep YAML)"


def _deep_manifest(volume: Path) -> str:
    size = DEFAULT_LIMITS.max_manifest_bytes
    (volume / MANIFEST_NAME).write_bytes(b"- " * (size // 2))
    return f"manifest of {size // MiB} MiB nested '- - - ...' (deep YAML), bundle inspect"


def _fifo_manifest(volume: Path) -> str:
    (volume / MANIFEST_NAME).unlink()
    os.mkfifo(volume / MANIFEST_NAME)
    return "manifest.yaml is a FIFO nobody writes to"


def _dev_zero_index(volume: Path) -> str:
    (volume / INDEX_NAME).unlink()
    (volume / INDEX_NAME).symlink_to("/dev/zero")
    return "index.bin is a symlink to /dev/zero"


_CASES = (
    (_huge_index, "verify"),
    (_huge_manifest, "verify"),
    (_many_signatures, "verify"),
    (_forged_roots, "verify"),
    (_deep_trust_root, "verify"),
    (_deep_manifest, "inspect"),
    (_fifo_manifest, "verify"),
    (_dev_zero_index, "verify"),
)


def _measure(media: Path, root: Path, now: str, mode: str) -> dict[str, Any]:
    args = json.dumps({"media": str(media), "root": str(root), "now": now, "mode": mode})
    done = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True,
                          timeout=_CHILD_TIMEOUT, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def costs(ctx: BenchContext) -> list[Cost]:
    work = ctx.workdir / "bench_hostile"
    setup = prepare(ctx, work, generated_mib=(4, 4))
    pristine = work / "media"
    setup.build(pristine)
    out: list[Cost] = []
    for i, (damage, mode) in enumerate(_CASES):
        media = work / f"case-{i}"
        shutil.copytree(pristine, media, symlinks=True)
        case = damage(media)
        got = _measure(media, setup.root_path, setup.now.isoformat(), mode)
        out.append(Cost(case=case, command="inspect" if mode == "inspect" else "verify/import",
                        outcome=got["outcome"], seconds=got["seconds"],
                        peak_mb=got["peak_kb"] / 1024, base_mb=got["base_kb"] / 1024))
        shutil.rmtree(media)
    return out


def markdown(rows: list[Cost]) -> str:
    lines = [
        f"Hostile input cost (aim: refused in under {AIM_SECONDS:.0f} s and "
        f"{AIM_PEAK_MB:.0f} MB peak RSS; each case in a fresh child process):",
        "",
        "| input | command | refused with | time to refuse | peak RSS | child baseline RSS "
        "| aim |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.command} | `{r.outcome}` | {r.seconds * 1000:.1f} ms "
            f"| {r.peak_mb:.0f} MB | {r.base_mb:.0f} MB | {'met' if r.within_aim else 'MISSED'} |"
        )
    return "\n".join(lines) + "\n"
