"""Snapshot tests (pytest-textual-snapshot) of the main screens at 80x24.

Everything shown is deterministic: the store and the bundle live at relative paths inside
tmp_path (the test changes into it), keys come from names, and the clock is pinned to
``NOW``. Update after an intended change with ``pytest tests/test_tui_snapshots.py
--snapshot-update`` and look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from trust_helpers import NOW, trusted_store
from tui_helpers import build_gguf_media, tamper_raw_chunk, wait_for

from appliance.importer import import_media
from appliance.tui.app import ApplianceApp, create_app
from appliance.tui.base import ExplainScreen
from appliance.tui.inspect import InspectPane
from appliance.tui.media import MediaPane
from appliance.tui.models import ModelsPane
from appliance.tui.trust import TrustPane

SnapCompare = Callable[..., bool]


@pytest.fixture()
def site(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path with ``store`` (trusting the test root) and ``bundle/media``."""
    monkeypatch.chdir(tmp_path)
    trusted_store(Path("store"))
    build_gguf_media(Path("bundle"), tiny_gguf)
    return tmp_path


def app_for(*, media: bool = True) -> ApplianceApp:
    return create_app(Path("store"), media=[Path("bundle/media")] if media else [],
                      scan_roots=(), clock=lambda: NOW)


async def _start(pilot: Pilot[Any]) -> None:
    # The snapshot driver starts the app unfocused (as after a blur); the first key press
    # focuses it, so press a harmless one: "1" shows the Media screen, where it starts.
    await pilot.press("1")


async def _media_listed(pilot: Pilot[Any]) -> None:
    await _start(pilot)
    pane = pilot.app.query_one(MediaPane)
    await wait_for(pilot, lambda: pane.found, what="the bundle listed")


async def _inspected(pilot: Pilot[Any]) -> None:
    await _media_listed(pilot)
    await pilot.press("enter")
    pane = pilot.app.query_one(InspectPane)
    await wait_for(pilot, lambda: pane.view is not None, what="inspection")


def test_media_screen(site: Path, snap_compare: SnapCompare) -> None:
    assert snap_compare(app_for(), run_before=_media_listed)


def test_inspect_screen_after_verify(site: Path, snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _inspected(pilot)
        await pilot.press("v")
        pane = pilot.app.query_one(InspectPane)
        await wait_for(pilot, lambda: pane.verified is not None, what="verification")
        await pilot.pause(0.3)  # the notification's text is part of the picture

    assert snap_compare(app_for(), run_before=run_before)


def test_tampered_refusal_explained(site: Path, snap_compare: SnapCompare) -> None:
    tamper_raw_chunk(Path("bundle/media"))

    async def run_before(pilot: Pilot[Any]) -> None:
        await _inspected(pilot)
        await pilot.press("v")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, ExplainScreen),
                       what="the refusal")

    assert snap_compare(app_for(), run_before=run_before)


def test_models_screen(site: Path, snap_compare: SnapCompare) -> None:
    import_media(Path("store"), [Path("bundle/media")], now=NOW)

    async def run_before(pilot: Pilot[Any]) -> None:
        await _start(pilot)
        await pilot.press("4")
        pane = pilot.app.query_one(ModelsPane)
        await wait_for(pilot, lambda: pane.models, what="the models")

    assert snap_compare(app_for(media=False), run_before=run_before)


def test_trust_screen(site: Path, snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await _start(pilot)
        await pilot.press("7")
        pane = pilot.app.query_one(TrustPane)
        await wait_for(pilot, lambda: pane.query_one("#trust-keys").row_count,  # type: ignore[attr-defined]
                       what="the trust root")

    assert snap_compare(app_for(media=False), run_before=run_before)


def test_help_screen(site: Path, snap_compare: SnapCompare) -> None:
    assert snap_compare(app_for(media=False), press=["1", "question_mark"])
