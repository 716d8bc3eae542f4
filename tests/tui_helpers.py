"""Helpers for the TUI tests: real bundles, Pilot waiting (stores: ``trust_helpers.trusted_store``).

Bundles are built by the real builder (``bundle_helpers.build``) from the session's tiny
runnable GGUF, signed by the deterministic publisher key ``p1`` and carrying the root made by
``trust_helpers.make_root``; the store installs that root with its fingerprint, at ``NOW``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from bundle_helpers import build, write_recipe
from textual.pilot import Pilot
from textual.widgets import Input, Static

from appliance.bundle.media import parse_index
from appliance.tui.app import ApplianceApp
from appliance.tui.base import Pane

MODEL = "acme/tiny"


def build_gguf_media(base: Path, gguf: Path, *, sequence: int = 1, out: str = "media",
                name: str = MODEL) -> Path:
    """A one-model bundle holding the tiny GGUF; returns the media directory."""
    src = base / "models"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tiny.gguf").write_bytes(gguf.read_bytes())
    recipe = write_recipe(base, files=("tiny.gguf",), name=name, sequence=sequence)
    build(base, recipe=recipe, out=out)
    return base / out


def tamper_raw_chunk(media: Path) -> None:
    """Flip one byte inside a chunk stored uncompressed (so the hash check must catch it)."""
    index = parse_index((media / "index.bin").read_bytes())
    entry = next(e for e in index.entries if not e.compressed and e.stored_length > 16)
    pack = media / "packs" / f"pack-{entry.pack:04d}.zst"
    with pack.open("r+b") as f:
        f.seek(entry.offset + entry.stored_length // 2)
        byte = f.read(1)
        f.seek(entry.offset + entry.stored_length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


async def wait_for(pilot: Pilot[None], predicate: Callable[[], object], timeout: float = 20.0,
                   what: str = "condition") -> None:
    """Let the app run until ``predicate()`` is true (workers finish, screens update)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


P = TypeVar("P", bound=Pane)


async def on_screen(app: ApplianceApp, pilot: Pilot[None], pane: type[P]) -> P:
    """The screen ``pane`` once the focus is inside it (its keys work from then on)."""
    widget = app.query_one(pane)
    await wait_for(pilot, lambda: app.focused is not None
                   and widget in app.focused.ancestors_with_self, what=f"{pane.TITLE} focus")
    return widget


Scenario = Callable[[ApplianceApp, Pilot[None]], Awaitable[None]]


def drive(app: ApplianceApp, scenario: Scenario, size: tuple[int, int] = (80, 24)) -> None:
    """Run ``scenario`` against ``app`` at ``size`` (animations off: Pilot waits them out)."""
    app.animation_level = "none"

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await scenario(app, pilot)

    asyncio.run(main())


def text(app: ApplianceApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def type_text(pilot: Pilot[None], value: str) -> None:
    """Type into the focused input: short texts key by key, long ones (paths) pasted."""
    if len(value) <= 24:
        await pilot.press(*[{" ": "space"}.get(c, c) for c in value])
        return
    focused = pilot.app.focused
    assert isinstance(focused, Input), f"typing into {focused!r}"
    focused.insert_text_at_cursor(value)
    await pilot.pause()
