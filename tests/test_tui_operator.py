"""Pilot tests of what a new operator tripped over (issue 21, items 5-11): keys that leak
into inputs, Inspect's one-key import, forms that keep what was typed, an UNVERIFIED bundle
before any root is installed, one progress line for every bar, the Serve dialog, the footer
and tables at 80x24, plain words for a mistyped path, and one ``models rm``."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, ProgressBar, Static
from trust_helpers import NOW, trusted_store
from tui_helpers import MODEL, build_gguf_media, drive, on_screen, text, type_text, wait_for

from appliance.cli.main import main
from appliance.errors import UsageError
from appliance.importer import import_media
from appliance.serve.model import DEFAULT_N_CTX
from appliance.store import audit, trust_state
from appliance.store.layout import human_bytes
from appliance.store.records import list_models
from appliance.store.removal import remove_model
from appliance.tui.app import PANES, ApplianceApp, create_app
from appliance.tui.base import (
    ConfirmScreen,
    ExplainScreen,
    FitTable,
    PromptScreen,
    pane_bindings,
)
from appliance.tui.explain import explain
from appliance.tui.importing import ImportPane
from appliance.tui.inspect import InspectPane
from appliance.tui.media import MediaPane
from appliance.tui.models import ModelsPane
from appliance.tui.progress import RateMeter, rate_text
from appliance.tui.serve import ServePane
from appliance.tui.serving import default_threads


def ticking(step: float = 1.0) -> RateMeter:
    """A meter whose clock advances ``step`` seconds at every reading."""
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    return RateMeter(clock)


# -- item 5: keys never leak into inputs --------------------------------------------------


def test_no_screen_key_is_typed_into_the_form_it_opens(tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: NOW, mdns=False,
                     insecure=True)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        app.ctx.selected = (media,)
        forms = 0
        for number, pane in enumerate(PANES, start=1):
            for b in pane_bindings(pane):
                if len(b.key) != 1 or b.key in "sxvdipcrm":  # work or the chat box, not a form
                    continue
                await pilot.press(str(number))
                await on_screen(app, pilot, pane)
                await pilot.press(b.key)
                await pilot.pause()
                if isinstance(app.screen, PromptScreen):
                    forms += 1
                    values = [i.value for i in app.screen.query(Input)]
                    assert b.key not in [v[-1:] for v in values if v], (pane.TITLE, b.key)
                    await pilot.press("escape")
        assert forms >= 5  # open path, add volume (2), allow expired (2), add peer, trust

    drive(app, scenario)


def test_the_chat_key_moves_to_the_chat_box_and_types_nothing(tmp_path: Path) -> None:
    app = create_app(trusted_store(tmp_path / "store"), scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        await pilot.press("6")
        serve = await on_screen(app, pilot, ServePane)
        chat = serve.query_one("#serve-input", Input)
        await pilot.press("m")
        assert app.focused is chat and chat.value == ""
        await pilot.press("s", "x", "q")  # in the box, letters are text, not commands
        assert chat.value == "sxq" and not serve.controller.running
        assert not isinstance(app.screen, PromptScreen)
        await pilot.press("escape")
        assert app.focused is not chat
        await pilot.press("m")
        assert app.focused is chat and chat.value == "sxq"

    drive(app, scenario)


# -- item 6: one i on Inspect imports; no busy-looking idle bar ---------------------------


def test_one_i_on_inspect_imports_and_the_idle_bar_is_hidden(tmp_path: Path,
                                                             tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        importing = app.query_one(ImportPane)
        assert not importing.query_one("#import-progress", ProgressBar).display
        await on_screen(app, pilot, MediaPane)
        await wait_for(pilot, lambda: app.query_one(MediaPane).found, what="the bundle")
        await pilot.press("enter")
        inspect = app.query_one(InspectPane)
        await wait_for(pilot, lambda: inspect.view is not None, what="inspection")
        await pilot.press("i")  # not verified first: the import checks every chunk itself
        await wait_for(pilot, lambda: importing.result is not None, what="the import")
        assert app.query_one("TabbedContent").active == "import"  # type: ignore[attr-defined]
        assert importing.result is not None and importing.result.complete
        assert importing.query_one("#import-progress", ProgressBar).percentage == 1.0

    drive(app, scenario)
    assert [m.ref for m in list_models(store)] == [f"{MODEL}:q4_k_m"]
    assert [r.kind for r in audit.records(store)].count("import") == 1


# -- item 7 (the class): a mistyped path brings the form back as typed --------------------


def test_a_mistyped_path_is_check_the_input_and_the_form_keeps_it(tmp_path: Path) -> None:
    app = create_app(trusted_store(tmp_path / "store"), scan_roots=(), clock=lambda: NOW)
    typo = str(tmp_path / "medai" / "bundle")

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        media = await on_screen(app, pilot, MediaPane)
        await pilot.press("o")
        await type_text(pilot, typo)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ExplainScreen), what="the error")
        assert isinstance(app.screen, ExplainScreen)
        assert app.screen.explanation.title == "Check the input"
        assert not app.screen.explanation.refused
        assert type(media.last_error) is UsageError
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="the form")
        assert app.screen.query_one("#field-path", Input).value == typo
        assert "Check the input" in text(app, "#prompt-problem")
        await pilot.press("escape")
        assert app.ctx.selected == ()

    drive(app, scenario)


def test_usage_errors_are_not_called_refusals() -> None:
    e = explain(UsageError("no such directory"))
    assert e.title == "Check the input" and not e.refused
    assert "Refused" not in e.title


def test_a_directory_without_a_bundle_is_not_shown_as_a_refusal(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    app = create_app(trusted_store(tmp_path / "store"), media=[empty], scan_roots=(),
                     clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        app.ctx.selected = (empty,)
        inspect = app.query_one(InspectPane)
        inspect.reload()
        await wait_for(pilot, lambda: inspect.last_error is not None, what="the error")
        summary = str(inspect.query_one("#inspect-summary", Static).render())
        assert explain(inspect.last_error).title in summary
        assert not summary.startswith("Refused")
        assert type(inspect.last_error).__name__ + "." not in summary

    drive(app, scenario)


# -- item 9: one progress formatter -------------------------------------------------------


def test_rate_meter_tells_rate_and_time_left_from_this_runs_bytes() -> None:
    meter = ticking()
    assert meter.text(40_000_000, 100_000_000) == "40.0 MB of 100.0 MB"  # baseline
    # 1 s later 10 MB more: 10 MB/s (the 40 MB already there do not count), 50 MB left.
    assert meter.text(50_000_000, 100_000_000) == "50.0 MB of 100.0 MB  10.0 MB/s, 0:05 left"
    assert rate_text(0.0, 10) == ""
    assert rate_text(1000.0, 7_200_000) == "1.0 KB/s, 2:00:00 left"


def test_verify_shows_rate_and_time_left(tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        app.ctx.selected = (media,)
        inspect = app.query_one(InspectPane)
        inspect.reload()
        await wait_for(pilot, lambda: inspect.view is not None, what="inspection")
        inspect.meter = ticking()
        lines: list[str] = []
        shown = inspect.on_progress

        def progress_and_look(done: int, total: int) -> None:
            shown(done, total)
            lines.append(text(app, "#inspect-volumes").splitlines()[0])

        inspect.on_progress = progress_and_look  # type: ignore[method-assign]
        inspect.action_verify()
        await wait_for(pilot, lambda: inspect.verified is not None, what="verification")
        assert any(line.startswith("verifying: ") and "/s, " in line and " left" in line
                   for line in lines), lines
        assert not text(app, "#inspect-volumes").startswith("verifying")

    drive(app, scenario)


def test_reverify_shows_rate_and_time_left_like_the_other_bars(tmp_path: Path,
                                                               tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    import_media(store, [build_gguf_media(tmp_path / "bundle", tiny_gguf)], now=NOW)
    app = create_app(store, scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        await pilot.press("4")
        models = await on_screen(app, pilot, ModelsPane)
        await wait_for(pilot, lambda: models.models, what="the model")
        models.meter = ticking()
        lines: list[str] = []
        shown = models.on_progress

        def progress_and_look(done: int, total: int) -> None:
            shown(done, total)
            lines.append(str(models.query_one("#models-rate", Static).render()))

        models.on_progress = progress_and_look  # type: ignore[method-assign]
        await pilot.press("v")
        await wait_for(pilot, lambda: lines and not models.busy, what="the re-verify")
        size = models.models[0].size  # one small file: one report, too soon for a rate
        assert lines == [f"re-verifying: {human_bytes(size)} of {human_bytes(size)}"]
        models.meter = ticking()  # a longer run: reports a second apart
        models.on_progress(1_000_000, 4_000_000)
        models.on_progress(2_000_000, 4_000_000)
        assert lines[-1] == "re-verifying: 2.0 MB of 4.0 MB  1.0 MB/s, 0:02 left"

    drive(app, scenario)


# -- item 11: footer and tables at 80x24, mount roots --------------------------------------


def test_help_key_and_quit_fit_the_footer_on_every_screen(tmp_path: Path) -> None:
    app = create_app(trusted_store(tmp_path / "store"), scan_roots=(), clock=lambda: NOW,
                     mdns=False, insecure=True)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        for number, pane in enumerate(PANES, start=1):
            await pilot.press(str(number))
            await on_screen(app, pilot, pane)
            await pilot.pause()
            keys = {getattr(w, "action", None): w for w in app.query("FooterKey")}
            for action in ("help", "quit"):
                region = keys[action].region
                assert region.width and region.right <= app.size.width, (pane.TITLE, action)

    drive(app, scenario)


def test_a_long_path_is_cut_with_an_ellipsis_not_off_screen(tmp_path: Path,
                                                            tiny_gguf: Path) -> None:
    deep = tmp_path / ("a-very-long-directory-name-for-the-usb-disk-" * 3) / "bundle"
    media = build_gguf_media(deep, tiny_gguf)
    app = create_app(trusted_store(tmp_path / "store"), media=[media], scan_roots=(),
                     clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        pane = await on_screen(app, pilot, MediaPane)
        await wait_for(pilot, lambda: pane.found, what="the bundle")
        await pilot.pause()
        table = pane.query_one("#media-table", FitTable)
        assert table.virtual_size.width <= table.scrollable_content_region.width
        row = "".join(s.text for s in table.render_lines(table.region.reset_offset)[1:2])
        assert "…" in row and "site-models #1" in row

    drive(app, scenario)


@pytest.mark.parametrize("roots", [(), ("mnt",)], ids=["none", "one"])
def test_no_bundle_found_says_which_roots_were_searched(tmp_path: Path,
                                                       roots: tuple[str, ...]) -> None:
    scan = [tmp_path / r for r in roots]
    for r in scan:
        r.mkdir()
    app = create_app(trusted_store(tmp_path / "store"), scan_roots=scan, clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        await wait_for(pilot, lambda: "No bundle found" in text(app, "#media-status"),
                       what="the empty list")
        status = " ".join(text(app, "#media-status").split())
        assert "no mount roots" not in status.replace("no mount roots configured", "")
        if scan:
            assert f"under {scan[0]}" in status
        else:
            assert "no mount roots configured" in status

    drive(app, scenario)


# -- models rm: one function, one audit user ----------------------------------------------


def test_models_rm_is_one_function_for_cli_and_tui_with_the_same_user(
        tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    import_media(store, [build_gguf_media(tmp_path / "b1", tiny_gguf)], now=NOW)
    import_media(store, [build_gguf_media(tmp_path / "b2", tiny_gguf, name="acme/other",
                                     sequence=2)], now=NOW)
    assert main(["--store", str(store), "models", "rm", "acme/other"]) == 0
    removed = remove_model(store, MODEL, NOW)
    assert removed.ref == f"{MODEL}:q4_k_m" and list_models(store) == []
    deletes = [r for r in audit.records(store) if r.kind == "delete"]
    assert [(r.details["model"], r.details["user"]) for r in deletes] == [
        ("acme/other", trust_state.who()), (MODEL, trust_state.who())]


# -- item 10: the Serve dialog -------------------------------------------------------------


@pytest.mark.slow
def test_serve_dialog_chooses_settings_keeps_typing_and_needs_the_key(
        tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    import_media(store, [build_gguf_media(tmp_path / "bundle", tiny_gguf)], now=NOW)
    keys = tmp_path / "api-keys"
    keys.write_text("k-3f9a2c7d1e5b90ab77\n")
    app = create_app(store, scan_roots=(), clock=lambda: NOW)
    panes: list[ServePane] = []

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        await pilot.press("6")
        serve = await on_screen(app, pilot, ServePane)
        panes.append(serve)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="the dialog")
        form = app.screen

        def field(name: str) -> Input:
            return form.query_one(f"#field-{name}", Input)

        assert "stops when you quit" in " ".join(
            str(w.render()) for w in form.query("Static"))
        assert field("models").value == MODEL
        assert field("ctx").value == str(DEFAULT_N_CTX)  # the CLI's default, one constant
        assert field("threads").value == str(default_threads())
        field("threads").value = "two"
        field("ctx").value = "256"
        field("keys").value = str(keys)
        field("keys").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ExplainScreen), what="the error")
        assert type(serve.last_error) is UsageError
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="the form")
        form = app.screen
        assert (field("threads").value, field("ctx").value, field("keys").value) == (
            "two", "256", str(keys))
        field("threads").value = "1"
        field("keys").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: (serve.last is not None and serve.last.state == "ok")
                       or isinstance(app.screen, ExplainScreen), timeout=120, what="the server")
        assert not isinstance(app.screen, ExplainScreen), app.screen.explanation.detail
        assert not isinstance(app.focused, Input)
        status = text(app, "#serve-status")
        assert "stops when the TUI quits" in status and "API key required" in status
        # The screen's own /metrics poll is not a request in flight.
        assert serve.last.metrics["appliance_serve_requests_in_flight"] == 0
        import httpx

        url = serve.controller.url
        assert httpx.get(f"{url}/v1/models").status_code == 401
        await pilot.press("m")
        await type_text(pilot, "hi")
        await pilot.press("enter")
        await wait_for(pilot, lambda: serve.answers, timeout=60, what="the answer")
        await pilot.press("escape", "q")  # quitting stops the server: asked first
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the ask")
        await pilot.press("n")
        assert serve.controller.running and not isinstance(app.screen, ConfirmScreen)
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the ask")
        await pilot.press("y")  # the app stops the server, then exits

    drive(app, scenario)
    assert app.return_code == 0 and not panes[0].controller.running
    starts = [r for r in audit.records(store) if r.kind == "serve-start"]
    assert len(starts) == 1
