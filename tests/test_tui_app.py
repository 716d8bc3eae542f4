"""The app shell: every action has a key and a palette entry, the help lists them all, the
refusal table covers every error class, and the layout fits 80x24."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from textual.widgets import Markdown, TabbedContent
from trust_helpers import NOW, trusted_store
from tui_helpers import drive, wait_for

from appliance import errors
from appliance.errors import ApplianceError, RefusalError
from appliance.tui.app import PANES, ApplianceApp, HelpScreen, create_app
from appliance.tui.base import Pane, PromptScreen, pane_bindings
from appliance.tui.explain import explain
from appliance.tui.service import Cancelled, cancellable, per_volume
from appliance.tui.serving import parse_metrics


def pane_actions(pane: type[Pane]) -> set[str]:
    """Every ``action_*`` a screen defines itself (not inherited plumbing)."""
    return {name.removeprefix("action_") for name, _ in inspect.getmembers(pane)
            if name.startswith("action_") and name in pane.__dict__}


@pytest.mark.parametrize("pane", PANES, ids=lambda p: p.PANE_ID)
def test_every_screen_action_has_a_key(pane: type[Pane]) -> None:
    bound = {b.action.split("(")[0] for b in pane_bindings(pane)}
    assert pane_actions(pane) <= bound, f"{pane.TITLE}: actions without a key"
    assert pane.HELP and pane.TITLE and pane.PANE_ID


def test_palette_lists_every_action_and_runs_it(tmp_path: Path) -> None:
    app = create_app(trusted_store(tmp_path / "store"), scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot) -> None:  # type: ignore[no-untyped-def]
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for number, pane in enumerate(PANES, start=1):
            assert f"Go to {pane.TITLE} ({number})" in titles
            for b in pane_bindings(pane):
                assert f"{pane.TITLE}: {b.description} ({b.key})" in titles
        assert "Help (?)" in titles
        await pilot.press("ctrl+p")
        await pilot.press(*"install root")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen),
                       what="the install-root form")
        assert app.query_one(TabbedContent).active == "trust"

    drive(app, scenario)


def test_help_lists_every_key_and_screen_keys_switch(tmp_path: Path) -> None:
    app = create_app(trusted_store(tmp_path / "store"), scan_roots=(), clock=lambda: NOW,
                     insecure=True, mdns=False)

    async def scenario(app: ApplianceApp, pilot) -> None:  # type: ignore[no-untyped-def]
        for number, pane in enumerate(PANES, start=1):
            await pilot.press(str(number))
            assert app.query_one(TabbedContent).active == pane.PANE_ID
            # Focus lands inside the screen, so its keys work without a click.
            await wait_for(pilot, lambda p=pane: app.focused is not None and p in (
                type(n) for n in app.focused.ancestors_with_self), what=f"{pane.TITLE} focus")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        source = app.screen.query_one(Markdown).source
        for pane in PANES:
            assert pane.HELP in source
            for b in pane_bindings(pane):
                assert f"| `{b.key}` | {b.description} |" in source
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    drive(app, scenario)


def _error_classes() -> list[type[ApplianceError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, ApplianceError) and c is not ApplianceError]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_is_explained_in_plain_words(cls: type[ApplianceError]) -> None:
    error = cls("the library's exact words")
    e = explain(error)
    assert e.title != "Failed", f"{cls.__name__} falls back to the generic explanation"
    assert e.refused == isinstance(error, RefusalError)
    assert e.what and e.next_step
    assert e.detail == f"{cls.__name__}: the library's exact words"


def test_unknown_exception_is_called_a_bug() -> None:
    e = explain(ZeroDivisionError("x"))
    assert e.title == "Unexpected error" and not e.refused


def test_cancellable_reports_then_stops() -> None:
    seen: list[tuple[int, int]] = []
    stop = False
    report = cancellable(lambda d, t: seen.append((d, t)), lambda: stop)
    report(1, 10)
    stop = True
    with pytest.raises(Cancelled):
        report(2, 10)
    assert seen == [(1, 10)]


def test_per_volume_progress_splits_bytes_in_volume_order() -> None:
    sizes = [("vol-001", 100), ("vol-002", 50)]
    assert per_volume(0, sizes) == [("vol-001", 0, 100), ("vol-002", 0, 50)]
    assert per_volume(120, sizes) == [("vol-001", 100, 100), ("vol-002", 20, 50)]
    assert per_volume(150, sizes) == [("vol-001", 100, 100), ("vol-002", 50, 50)]


def test_parse_metrics_sums_known_families() -> None:
    text = ("# HELP x\nappliance_serve_tokens_generated_total{model=\"a\"} 3\n"
            "appliance_serve_tokens_generated_total{model=\"b\"} 4\n"
            "appliance_serve_queue_depth 1\nother_metric 9\n")
    assert parse_metrics(text) == {"appliance_serve_tokens_generated_total": 7.0,
                                   "appliance_serve_queue_depth": 1.0}
