"""Pilot tests of the Peers screen against a real peer server on loopback.

Host A imports a real bundle and serves its store (``appliance.peer.server``, plaintext on
127.0.0.1 because the test says ``insecure``); the TUI runs on host B's store, lists A with
what it holds, and pulls the model, which B then lists as verified.
"""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Static
from trust_helpers import NOW, trusted_store
from tui_helpers import MODEL, build_gguf_media, drive, on_screen, wait_for

from appliance.errors import UsageError
from appliance.importer import import_media
from appliance.peer.server import serve_store
from appliance.store.records import list_models
from appliance.tui.app import create_app
from appliance.tui.base import ExplainScreen
from appliance.tui.peers import PeersPane


def test_peer_listed_and_pulled(tmp_path: Path, tiny_gguf: Path) -> None:
    host_a = trusted_store(tmp_path / "a")
    import_media(host_a, [build_gguf_media(tmp_path / "bundle", tiny_gguf)], now=NOW)
    host_b = trusted_store(tmp_path / "b")
    server = serve_store(host_a, host="127.0.0.1", port=0, tls_dir=None, insecure=True,
                         host_name="host-a").start()
    try:
        app = create_app(host_b, scan_roots=(), clock=lambda: NOW, peers=[server.url],
                         insecure=True, mdns=False)

        async def scenario(app, pilot) -> None:  # type: ignore[no-untyped-def]
            await pilot.press("5")
            peers = await on_screen(app, pilot, PeersPane)
            await wait_for(pilot, lambda: peers.peers, what="the peer list")
            assert [(p.url, p.host, p.models) for p in peers.peers] == [
                (server.url, "host-a", (f"{MODEL}:q4_k_m",))]
            assert "PLAINTEXT" in str(app.query_one("#peers-status", Static).render())
            await pilot.press("p", "enter")  # the prompt offers every model the peers hold
            await wait_for(pilot, lambda: peers.results is not None, what="the pull")
            assert peers.results is not None
            assert [r.models for r in peers.results] == [[f"{MODEL}:q4_k_m"]]
            assert "pulled acme/tiny:q4_k_m" in str(app.query_one("#peers-result",
                                                                  Static).render())

        drive(app, scenario)
    finally:
        server.stop()
    assert [(m.ref, m.verified) for m in list_models(host_b)] == [(f"{MODEL}:q4_k_m", True)]


def test_peers_without_site_certificate_say_how_to_get_one(tmp_path: Path) -> None:
    store = trusted_store(tmp_path / "store")
    app = create_app(store, scan_roots=(), clock=lambda: NOW, mdns=False)

    async def scenario(app, pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("5")
        peers = app.query_one(PeersPane)
        await wait_for(pilot, lambda: peers.last_error is not None, what="the explanation")
        assert type(peers.last_error) is UsageError
        status = str(app.query_one("#peers-status", Static).render())
        assert "Peers are not set up" in status and "site enroll" in status
        assert not isinstance(app.screen, ExplainScreen)  # shown in place, no dialog

    drive(app, scenario)


def test_a_pull_that_fails_brings_the_form_back_as_typed(tmp_path: Path, tiny_gguf: Path) -> None:
    from textual.widgets import Input

    from appliance.errors import ApplianceError
    from appliance.tui.base import PromptScreen

    host_a = trusted_store(tmp_path / "a")
    import_media(host_a, [build_gguf_media(tmp_path / "bundle", tiny_gguf)], now=NOW)
    server = serve_store(host_a, host="127.0.0.1", port=0, tls_dir=None, insecure=True,
                         host_name="host-a").start()
    try:
        app = create_app(trusted_store(tmp_path / "b"), scan_roots=(), clock=lambda: NOW,
                         peers=[server.url], insecure=True, mdns=False)

        async def scenario(app, pilot) -> None:  # type: ignore[no-untyped-def]
            await pilot.press("5")
            peers = await on_screen(app, pilot, PeersPane)
            await wait_for(pilot, lambda: peers.peers, what="the peer list")
            await pilot.press("p")
            await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="form")
            app.screen.query_one("#field-models", Input).value = "acme/nope"
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ExplainScreen),
                           what="the explanation")
            assert isinstance(peers.last_error, ApplianceError)
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="form")
            assert app.screen.query_one("#field-models", Input).value == "acme/nope"

        drive(app, scenario)
    finally:
        server.stop()
    assert list_models(tmp_path / "b") == []
