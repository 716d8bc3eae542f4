"""Pilot tests of the screens' own actions: media coming and going, cancelling and
resuming an import, deleting and re-verifying models, and the audit chain check."""

from __future__ import annotations

import shutil
from pathlib import Path

from bundle_helpers import build, make_sources, write_recipe
from textual.widgets import Static
from trust_helpers import NOW, trusted_store
from tui_helpers import MODEL, build_gguf_media, drive, on_screen, text, wait_for

from appliance.importer import import_media
from appliance.store import audit, trust_state
from appliance.store.db import connect
from appliance.store.records import list_models
from appliance.tui.app import ApplianceApp, create_app
from appliance.tui.audit import AuditPane
from appliance.tui.base import ConfirmScreen
from appliance.tui.importing import ImportPane
from appliance.tui.media import MediaPane
from appliance.tui.models import ModelsPane


def test_media_appear_and_go(tmp_path: Path, tiny_gguf: Path) -> None:
    mounts = tmp_path / "run-media"
    (mounts / "operator").mkdir(parents=True)
    store = trusted_store(tmp_path / "store")
    app = create_app(store, scan_roots=[mounts], clock=lambda: NOW, rescan_seconds=0.2)

    async def scenario(app: ApplianceApp, pilot) -> None:  # type: ignore[no-untyped-def]
        media = app.query_one(MediaPane)
        await wait_for(pilot, lambda: "No bundle found" in text(app, "#media-status"),
                       what="the empty media list")
        usb = build_gguf_media(mounts / "operator" / "USB-DISK", tiny_gguf)  # "inserted"
        await wait_for(pilot, lambda: [c.path for c in media.found] == [usb],
                       what="the inserted media")
        assert media.found[0].models == (f"{MODEL}:q4_k_m",)
        shutil.rmtree(mounts / "operator" / "USB-DISK")  # "removed"
        await wait_for(pilot, lambda: media.found == [], what="the media to go")

    drive(app, scenario)


def test_import_cancel_then_resume(tmp_path: Path) -> None:
    store = trusted_store(tmp_path / "store")
    base = tmp_path / "bundle"
    make_sources(base, random_mib=12)
    build(base, recipe=write_recipe(base, files=("weights.bin",)))
    app = create_app(store, media=[base / "media"], scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot) -> None:  # type: ignore[no-untyped-def]
        media = app.query_one(MediaPane)
        await wait_for(pilot, lambda: media.found, what="the bundle")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.ctx.selected, what="the bundle chosen")
        await pilot.press("3")
        importing = await on_screen(app, pilot, ImportPane)
        # The import reads 12 MiB in a blink, faster than a key press arrives: cancel the
        # moment its first progress report reaches the screen, as an operator's c would.
        shown = importing.on_progress

        def progress_then_cancel(done: int, total: int) -> None:
            shown(done, total)
            importing.action_cancel()

        importing.on_progress = progress_then_cancel  # type: ignore[method-assign]
        await pilot.press("i")
        await wait_for(pilot, lambda: "cancelled" in text(app, "#import-result"),
                       what="the cancellation")
        assert importing.result is None and not importing.busy
        assert list_models(store) == []
        importing.on_progress = shown  # type: ignore[method-assign]
        await pilot.press("i")
        await wait_for(pilot, lambda: importing.result is not None, timeout=60,
                       what="the resumed import")
        assert importing.result is not None and importing.result.complete
        assert importing.result.already_done_bytes > 0  # resumed, not started over

    drive(app, scenario)
    assert [m.ref for m in list_models(store)] == ["acme/tiny:q4_k_m"]


def test_models_delete_reverify_and_audit_chain(tmp_path: Path, tiny_gguf: Path) -> None:
    store = trusted_store(tmp_path / "store")
    import_media(store, [build_gguf_media(tmp_path / "b1", tiny_gguf)], now=NOW)
    import_media(store, [build_gguf_media(tmp_path / "b2", tiny_gguf, name="acme/other",
                                     sequence=2)], now=NOW)
    other = next(m for m in list_models(store) if m.name == "acme/other")
    with other.path.open("r+b") as f:  # bit rot in a published file
        f.seek(other.size // 2)
        byte = f.read(1)
        f.seek(other.size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    app = create_app(store, scan_roots=(), clock=lambda: NOW)

    async def scenario(app: ApplianceApp, pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("4")
        models = await on_screen(app, pilot, ModelsPane)
        await wait_for(pilot, lambda: len(models.models) == 2, what="two models")
        assert [m.name for m in models.models] == ["acme/other", MODEL]

        await pilot.press("v")  # re-verify: the rotten file is quarantined, never served
        await wait_for(pilot, lambda: any(not m.verified for m in models.models),
                       what="the quarantine")
        assert [(m.name, m.verified) for m in models.models] == [
            ("acme/other", False), (MODEL, True)]

        await pilot.press("d")  # the cursor is on acme/other
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert len(models.models) == 2
        await pilot.press("d", "y")
        await wait_for(pilot, lambda: [m.name for m in models.models] == [MODEL],
                       what="the deletion")

        await pilot.press("8")
        log = await on_screen(app, pilot, AuditPane)
        await wait_for(pilot, lambda: log.view is not None and log.view.records[0].kind
                       == "delete", what="the audit log, newest first")
        assert "chain intact" in str(app.query_one("#audit-status", Static).render())

    drive(app, scenario)
    kinds = [r.kind for r in audit.records(store)]
    assert "quarantine" in kinds and kinds[-1] == "delete"
    # The same removal as `appliance models rm` (store.removal), audited with the same user.
    assert list(audit.records(store))[-1].details["user"] == trust_state.who()

    db = connect(store)  # an intruder edits record 2 behind the store's back
    db.execute("UPDATE audit SET details = '{}' WHERE seq = 2")
    db.close()
    app = create_app(store, scan_roots=(), clock=lambda: NOW)

    async def broken(app: ApplianceApp, pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("8")
        log = await on_screen(app, pilot, AuditPane)
        await wait_for(pilot, lambda: log.view is not None, what="the audit log")
        assert log.view is not None and not log.view.chain_ok
        status = str(app.query_one("#audit-status", Static).render())
        assert "CHAIN BROKEN" in status and "record 2 was edited" in status

    drive(app, broken)
