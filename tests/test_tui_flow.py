"""Pilot tests of the operator's flows against real bundles, stores and servers in tmp_path.

Each test drives ``appliance.tui.app.create_app`` with key presses only (as an operator
would) at 80x24, waits for the worker threads, and checks both the screen's state and the
store (models listed, audit records) through the library.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, RichLog
from trust_helpers import NOW, trusted_store
from tui_helpers import (
    MODEL,
    build_gguf_media,
    drive,
    on_screen,
    tamper_raw_chunk,
    text,
    type_text,
    wait_for,
)

from appliance.errors import ExpiredError, IntegrityError, NoTrustRootError, RollbackError
from appliance.store import audit
from appliance.store.records import list_models
from appliance.tui.app import ApplianceApp, create_app
from appliance.tui.base import ExplainScreen, PromptScreen
from appliance.tui.importing import ImportPane
from appliance.tui.inspect import InspectPane
from appliance.tui.media import MediaPane
from appliance.tui.models import ModelsPane
from appliance.tui.serve import ServePane
from appliance.tui.trust import TrustPane


async def choose_bundle(app: ApplianceApp, pilot: Pilot[None]) -> InspectPane:
    media = await on_screen(app, pilot, MediaPane)  # its Enter binding needs the focus inside
    table = media.query_one("#media-table", DataTable)
    await wait_for(pilot, lambda: media.found and table.row_count,
                   what="the bundle on the Media screen")
    await pilot.press("enter")
    inspect = app.query_one(InspectPane)
    await wait_for(pilot, lambda: inspect.view is not None or inspect.last_error is not None,
                   what="inspection")
    return inspect


async def close_explanation(app: ApplianceApp, pilot: Pilot[None]) -> str:
    await wait_for(pilot, lambda: isinstance(app.screen, ExplainScreen), what="explanation")
    assert isinstance(app.screen, ExplainScreen)
    title = app.screen.explanation.title
    await pilot.press("escape")
    return title


@pytest.mark.slow
def test_media_to_verified_import_to_served_chat(tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: NOW, serve_ctx=256)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        assert app.query_one("TabbedContent").active == "inspect"  # type: ignore[attr-defined]
        assert inspect.view is not None
        assert [m.name for m in inspect.view.manifest.models] == [MODEL]
        summary = text(app, "#inspect-summary")
        assert "site-models #1" in summary and "signed by p1" in summary

        await pilot.press("v")
        await wait_for(pilot, lambda: inspect.verified is not None, what="verification")
        assert inspect.verified is not None and inspect.verified.complete
        assert "verified" in text(app, "#inspect-volumes")

        await pilot.press("i")  # one key: to the Import screen, and the import starts
        importing = await on_screen(app, pilot, ImportPane)
        await wait_for(pilot, lambda: importing.result is not None, what="the import")
        assert importing.result is not None and importing.result.complete
        assert "imported completely" in text(app, "#import-result")

        await pilot.press("4")
        models = await on_screen(app, pilot, ModelsPane)
        await wait_for(pilot, lambda: [m.ref for m in models.models] == [f"{MODEL}:q4_k_m"],
                       what="the model on the Models screen")
        assert models.models[0].verified
        assert [m.ref for m in list_models(store)] == [f"{MODEL}:q4_k_m"]

        await pilot.press("6")
        serve = await on_screen(app, pilot, ServePane)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen),
                       what="the server options")
        await pilot.press("enter", "enter", "enter", "enter", "enter")  # the defaults
        await wait_for(pilot, lambda: serve.last is not None and serve.last.state == "ok",
                       timeout=120, what="the server to load the model")
        assert not isinstance(app.focused, Input)  # the focus stays where it was
        await pilot.press("m")  # the documented key goes to the chat box, typing nothing
        chat = app.query_one("#serve-input", Input)
        assert app.focused is chat and chat.value == ""
        await type_text(pilot, "hello there")
        await pilot.press("enter")
        await wait_for(pilot, lambda: serve.answers, timeout=60, what="the model's answer")
        # The answer came from the tiny model through the server: it counted the tokens.
        # (Not compared with a second request: with a warm prompt cache, random weights can
        # break a near-tie differently.)
        assert len(serve.answers) == 1 and serve.answers[0].strip()
        log = "\n".join(str(line.text) for line in app.query_one(RichLog).lines)
        assert f"model> {serve.answers[0]}" in log
        status = serve.controller.status()
        assert status.metrics["appliance_serve_tokens_generated_total"] >= 1
        await pilot.press("escape")  # leave the chat box, so keys are commands again
        await wait_for(pilot, lambda: not isinstance(app.focused, Input), what="chat left")
        await pilot.press("x")
        await wait_for(pilot, lambda: not serve.controller.running, timeout=60,
                       what="the server to stop")

    drive(app, scenario)
    kinds = [r.kind for r in audit.records(store)]
    assert kinds.count("import") == 1 and "serve-start" in kinds
    assert audit.verify(store) == len(kinds)


def test_tampered_bundle_is_refused_in_plain_words(tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    tamper_raw_chunk(media)
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        assert inspect.view is not None  # signatures are fine: only the bytes differ
        await pilot.press("v")
        assert await close_explanation(app, pilot) == "Refused: tampered or damaged chunk"
        assert type(inspect.last_error) is IntegrityError
        assert "verification failed" in text(app, "#inspect-volumes")

        await pilot.press("i")  # importing the same media is refused too
        importing = app.query_one(ImportPane)
        assert await close_explanation(app, pilot) == "Refused: tampered or damaged chunk"
        assert type(importing.last_error) is IntegrityError
        assert "Do not use this media" in text(app, "#import-result")

    drive(app, scenario)
    assert list_models(store) == []
    refusals = [r for r in audit.records(store) if r.kind == "refusal"]
    assert refusals and refusals[-1].details["error"] == "IntegrityError"


def test_expired_bundle_needs_a_typed_reason(tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)  # expires 30 days after NOW
    late = NOW + timedelta(days=60)
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: late)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        assert await close_explanation(app, pilot) == "Refused: expired"
        assert type(inspect.last_error) is ExpiredError
        assert "Press e" in text(app, "#inspect-summary")

        await pilot.press("e")
        await pilot.press("enter")  # an empty reason is not accepted
        assert "needed" in text(app, "#prompt-problem")
        await type_text(pilot, "site offline since May")
        await pilot.press("enter")
        await wait_for(pilot, lambda: inspect.view is not None, what="inspection with override")
        assert inspect.view is not None and inspect.view.expired
        assert app.ctx.override_reason == "site offline since May"

        await pilot.press("i")
        importing = await on_screen(app, pilot, ImportPane)
        await wait_for(pilot, lambda: importing.result is not None, what="the import")
        assert importing.result is not None and importing.result.expired_override

    drive(app, scenario)
    overrides = [r for r in audit.records(store) if r.kind == "override"]
    assert [r.details["reason"] for r in overrides] == ["site offline since May"]


def test_older_bundle_is_refused_as_rollback(tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    newer = build_gguf_media(tmp_path / "b2", tiny_gguf, sequence=2)
    older = build_gguf_media(tmp_path / "b1", tiny_gguf, sequence=1)
    from appliance.importer import import_media

    import_media(store, [newer], now=NOW)
    app = create_app(store, media=[older], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        assert inspect.view is not None and inspect.view.rollback is not None
        assert "rollback" in text(app, "#inspect-summary")
        await pilot.press("i")
        importing = app.query_one(ImportPane)
        assert await close_explanation(app, pilot) == "Refused: older bundle (rollback)"
        assert app.query_one("TabbedContent").active == "import"  # type: ignore[attr-defined]
        assert type(importing.last_error) is RollbackError

    drive(app, scenario)


def test_no_trust_root_says_how_to_install_one_and_install_works(tmp_path: Path,
                                                                  tiny_gguf: Path) -> None:
    from trust_helpers import make_root

    store = tmp_path / "store"
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    signed = make_root()
    root_file = tmp_path / "root-1.yaml"
    root_file.write_bytes(signed.to_bytes())
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        # Shown as the CLI's `bundle inspect` shows it without --trust: claims, UNVERIFIED.
        assert inspect.last_error is None and inspect.view is not None
        assert not inspect.view.verified
        summary = text(app, "#inspect-summary")
        assert "UNVERIFIED" in summary and "claims signed by p1" in summary
        assert [m.name for m in inspect.view.manifest.models] == [MODEL]
        await pilot.press("v")  # nothing can be verified against no root
        assert await close_explanation(app, pilot) == "No trust root installed"
        assert type(inspect.last_error) is NoTrustRootError
        await pilot.press("i")  # nor imported: the screen says so and stays
        assert app.query_one("TabbedContent").active == "inspect"  # type: ignore[attr-defined]

        await pilot.press("7")
        await on_screen(app, pilot, TrustPane)
        await wait_for(pilot, lambda: "No trust root" in text(app, "#trust-summary"),
                       what="the empty trust screen")
        await pilot.press("t")  # the root carried on the media is offered
        path_field = app.screen.query_one("#field-path", Input)
        assert path_field.value == str(media / "trust" / "root-1.yaml")
        path_field.value = str(root_file)  # the operator's own copy, as typed
        await pilot.press("enter")
        await type_text(pilot, "0000-0000-0000-0000-0000-0000-0000-0000")
        await pilot.press("enter")
        assert await close_explanation(app, pilot) == "Refused: fingerprint does not match"

        # The form comes back as typed, the problem named under it.
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="the form")
        assert app.screen.query_one("#field-path", Input).value == str(root_file)
        fingerprint = app.screen.query_one("#field-fingerprint", Input)
        assert fingerprint.value == "0000-0000-0000-0000-0000-0000-0000-0000"
        assert "fingerprint does not match" in text(app, "#prompt-problem")
        fingerprint.value = ""
        fingerprint.focus()
        await pilot.pause()
        await type_text(pilot, signed.root.fingerprint)
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, PromptScreen), what="submit")
        assert not isinstance(app.screen, ExplainScreen), app.screen.explanation.detail
        await wait_for(pilot, lambda: signed.root.fingerprint in text(app, "#trust-summary"),
                       what="the installed root")
        assert "trust root v1" in text(app, "#trust-summary")

    drive(app, scenario)
    assert [r.kind for r in audit.records(store)] == ["refusal", "trust-install"]


def test_missing_volume_is_asked_for_and_import_resumes(tmp_path: Path) -> None:
    from bundle_helpers import build, make_sources

    from appliance.bundle.recipe import parse_size
    from appliance.limits import MAX_CHUNK_BYTES

    store = trusted_store(tmp_path / "store")
    make_sources(tmp_path / "b", random_mib=14)
    result = build(tmp_path / "b", volume_size=parse_size("12M"), pack_size=MAX_CHUNK_BYTES)
    volumes = list(result.volumes)
    assert len(volumes) >= 2
    later = tuple(v.name for v in volumes[1:])
    app = create_app(store, media=[volumes[0]], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        assert inspect.view is not None and inspect.view.volumes_missing == later
        assert "insert the next volume" in text(app, "#inspect-volumes")

        await pilot.press("i")
        importing = await on_screen(app, pilot, ImportPane)
        await wait_for(pilot, lambda: importing.result is not None, what="the partial import")
        assert importing.result is not None and not importing.result.complete
        assert importing.result.volumes_needed == later
        assert f"insert {', '.join(later)}" in text(app, "#import-result")

        for volume in volumes[1:]:  # any order would do; one path per prompt
            await pilot.press("a")
            await type_text(pilot, str(volume))
            await pilot.press("enter")
        importing.result = None
        await pilot.press("i")
        await wait_for(pilot, lambda: importing.result is not None, what="the resumed import")
        assert importing.result is not None and importing.result.complete

    drive(app, scenario)
    assert [m.ref for m in list_models(store)] == ["acme/tiny:q4_k_m"]


def test_unknown_signer_is_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    from bundle_helpers import rewrite_manifest

    from appliance.errors import ThresholdError

    store = trusted_store(tmp_path / "store")
    media = build_gguf_media(tmp_path / "bundle", tiny_gguf)
    # Same manifest bytes, but signed only by a key this site never trusted.
    rewrite_manifest(media, (media / "manifest.yaml").read_bytes(), signers=("stranger",))
    app = create_app(store, media=[media], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        assert await close_explanation(app, pilot) == "Refused: not enough valid signatures"
        assert type(inspect.last_error) is ThresholdError
        assert inspect.view is None  # nothing from an unauthenticated manifest is shown

    drive(app, scenario)


def test_trust_root_update_carried_on_media_is_shown_then_installed(
        tmp_path: Path, tiny_gguf: Path) -> None:
    from bundle_helpers import build, write_recipe
    from trust_helpers import make_root

    store = trusted_store(tmp_path / "store")
    v2 = make_root(version=2)
    base = tmp_path / "bundle"
    (base / "models").mkdir(parents=True)
    (base / "models" / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    build(base, recipe=write_recipe(base, files=("tiny.gguf",), name=MODEL), root=v2)
    app = create_app(store, media=[base / "media"], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot: Pilot[None]) -> None:
        inspect = await choose_bundle(app, pilot)
        assert inspect.view is not None
        assert (inspect.view.trust_from, inspect.view.trust_to) == (1, 2)
        assert "v1 -> v2 will be installed" in text(app, "#inspect-summary")
        await pilot.press("i")
        importing = await on_screen(app, pilot, ImportPane)
        await wait_for(pilot, lambda: importing.result is not None, what="the import")
        await pilot.press("7")
        await on_screen(app, pilot, TrustPane)
        await wait_for(pilot, lambda: "trust root v2" in text(app, "#trust-summary"),
                       what="the new root on the Trust screen")
        assert v2.root.fingerprint in text(app, "#trust-summary")

    drive(app, scenario)
