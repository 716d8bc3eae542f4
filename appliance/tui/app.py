"""The operator's TUI: eight screens in a tab switcher, a footer with the keys, a command
palette listing every action, and a help screen.

``create_app(store_dir, ...)`` is the factory the CLI and the tests use. The screens are
``Pane`` widgets (``appliance.tui.base``), one module each; this module only arranges them,
routes the cross-screen messages (a bundle chosen on Media goes to Inspect, an import
request to Import, a store change reloads Models, Trust and Audit) and builds the palette.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Markdown, TabbedContent, TabPane

from appliance import __version__
from appliance.serve.model import DEFAULT_N_CTX
from appliance.tui.audit import AuditPane
from appliance.tui.base import (
    BundleChosen,
    Clock,
    ConfirmScreen,
    ImportWanted,
    Pane,
    StoreChanged,
    TuiContext,
    pane_bindings,
    utc_now,
)
from appliance.tui.importing import ImportPane
from appliance.tui.inspect import InspectPane
from appliance.tui.media import MediaPane
from appliance.tui.models import ModelsPane
from appliance.tui.peers import PeersPane
from appliance.tui.serve import ServePane
from appliance.tui.service import DEFAULT_SCAN_ROOTS
from appliance.tui.serving import prepare_spawning
from appliance.tui.trust import TrustPane

PANES: tuple[type[Pane], ...] = (
    MediaPane, InspectPane, ImportPane, ModelsPane, PeersPane, ServePane, TrustPane, AuditPane,
)

FLOW = """\
**From media to a served model** (each step's key switches to its screen)

- `1` **Media**: insert the USB disk; the bundle appears (or press `o` and type its path).
  Select it and press `Enter`.
- `2` **Inspect**: check the models, signers (read the fingerprint words), channel, sequence
  and expiry. Press `v` to verify every byte (optional), then `i` to import. On a host with
  no trust root yet the bundle is shown UNVERIFIED: install the root on Trust (`7`) first.
- `3` **Import**: the import runs here. Progress, speed and time left are shown; `c`
  cancels, and `i` imports again, resuming where it stopped.
- `4` **Models**: the model is listed once every byte is verified.
- `6` **Serve**: press `s`, choose the models and settings, `Enter` starts the server (it
  stops when the TUI quits). Press `m`, type a question and press `Enter`; `Esc` comes back.

A refusal (older bundle, expired, unknown signer, tampered data) is explained in plain words
with what to do next. Overriding an expiry needs a typed reason: it goes to the audit log.
"""


class KeysFooter(Footer):
    """The footer with ``? Help`` first: on a narrow terminal the keys at the end are cut,
    and help is the one that lists all of them."""

    def compose(self) -> ComposeResult:
        keys = list(super().compose())
        # FooterKey is not public: a key is told by its action.
        yield from sorted(keys, key=lambda w: getattr(w, "action", None) != "help")


class HelpScreen(ModalScreen[None]):
    """Every key of every screen, and the flow from media to a served model."""

    AUTO_FOCUS = "*"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark,f1", "close",
                                                     "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%; height: 90%; border: thick $primary; background: $surface;
    }
    """

    def compose(self) -> ComposeResult:
        lines = [FLOW, "**Keys everywhere**", "",
                 "| key | action |", "|---|---|",
                 "| `1`..`8` | switch screen |", "| `ctrl+p` | command palette (every action) |",
                 "| `?` / `F1` | this help |", "| `q` / `ctrl+q` | quit |", ""]
        for number, pane in enumerate(PANES, start=1):
            lines += [f"**{number} {pane.TITLE}**: {pane.HELP}", "",
                      "| key | action |", "|---|---|"]
            lines += [f"| `{b.key}` | {b.description} |" for b in pane_bindings(pane)]
            lines.append("")
        with VerticalScroll():
            yield Markdown("\n".join(lines))

    def action_close(self) -> None:
        self.dismiss(None)


class ApplianceApp(App[None]):
    """The TUI. Build it with ``create_app``."""

    TITLE = "appliance"
    # Focus goes into the first screen once ready (not to the tab strip), so its keys are
    # live from the start; modal screens set their own.
    AUTO_FOCUS = None
    CSS = """
    TabbedContent { height: 1fr; }
    TabPane { padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark,f1", "help", "Help"),
        Binding("q,ctrl+q", "quit", "Quit"),
        *[Binding(str(n), f"show_pane('{p.PANE_ID}')", p.TITLE, show=False)
          for n, p in enumerate(PANES, start=1)],
    ]

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.sub_title = f"store {ctx.store_dir}"

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="screens"):
            for number, pane in enumerate(PANES, start=1):
                with TabPane(f"{number} {pane.TITLE}", id=pane.PANE_ID):
                    yield pane(self.ctx)
        yield KeysFooter()

    def on_ready(self) -> None:
        self.current_pane.focus_first()

    # -- navigation ----------------------------------------------------------------------

    def pane(self, pane_id: str) -> Pane:
        return self.query_one(f"#pane-{pane_id}", Pane)

    @property
    def current_pane(self) -> Pane:
        return self.pane(self.query_one(TabbedContent).active)

    def action_show_pane(self, pane_id: str) -> None:
        self.query_one(TabbedContent).active = pane_id
        self.call_after_refresh(self._focus_pane, pane_id)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.call_after_refresh(self._focus_pane, event.pane.id or "")

    def _focus_pane(self, pane_id: str) -> None:
        # Only if still shown: focusing a widget in a hidden tab would switch back to it.
        tabs = self.query(TabbedContent)
        if tabs and tabs.first().active == pane_id:
            self.pane(pane_id).focus_first()

    async def action_quit(self) -> None:
        """Leave; a running server stops with the TUI, so that is asked first."""
        serve = self.query(ServePane)
        if serve and serve.first().controller.running:
            url = serve.first().controller.url
            self.push_screen(
                ConfirmScreen(f"The server at {url} runs inside this TUI: quitting stops it. "
                              "Quit and stop the server? (For one that keeps running: "
                              "'appliance serve' or its systemd unit.)"),
                self._quit_answered,
            )
            return
        self.exit()

    async def _quit_answered(self, yes: bool | None) -> None:
        if not yes:
            return
        # Its workers are child processes: stopped off the UI thread.
        self.notify("stopping the server...")
        await asyncio.to_thread(self.query_one(ServePane).controller.stop)
        self.exit()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def run_pane_action(self, pane_id: str, action: str) -> None:
        """Switch to a screen and run one of its actions (used by the command palette)."""
        self.action_show_pane(pane_id)
        pane = self.pane(pane_id)
        self.call_after_refresh(self.run_action, action, pane)

    # -- cross-screen messages -----------------------------------------------------------

    def on_bundle_chosen(self, message: BundleChosen) -> None:
        self.ctx.selected = message.paths
        self.ctx.override_reason = None
        self.action_show_pane(InspectPane.PANE_ID)
        self.pane(InspectPane.PANE_ID).reload()

    def on_import_wanted(self, message: ImportWanted) -> None:
        self.action_show_pane(ImportPane.PANE_ID)
        importing = self.query_one(ImportPane)
        importing.reload()
        importing.action_start()

    def on_store_changed(self, message: StoreChanged) -> None:
        for pane_id in (ModelsPane.PANE_ID, TrustPane.PANE_ID, AuditPane.PANE_ID,
                        ServePane.PANE_ID):
            self.pane(pane_id).reload()

    # -- command palette -----------------------------------------------------------------

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        for number, pane in enumerate(PANES, start=1):
            yield SystemCommand(f"Go to {pane.TITLE} ({number})", pane.HELP,
                                self._go(pane.PANE_ID))
        for pane in PANES:
            for b in pane_bindings(pane):
                yield SystemCommand(f"{pane.TITLE}: {b.description} ({b.key})",
                                    f"on the {pane.TITLE} screen, key {b.key}",
                                    self._run(pane.PANE_ID, b.action))
        yield SystemCommand("Help (?)", "every key and the flow from media to a served model",
                            self.action_help)
        yield from super().get_system_commands(screen)

    def _go(self, pane_id: str) -> Callable[[], None]:
        return lambda: self.action_show_pane(pane_id)

    def _run(self, pane_id: str, action: str) -> Callable[[], None]:
        return lambda: self.run_pane_action(pane_id, action)


def create_app(
    store_dir: Path,
    *,
    media: Sequence[Path] = (),
    clock: Clock | None = None,
    scan_roots: Sequence[Path] | None = None,
    serve_listen: str = "127.0.0.1:0",
    serve_ctx: int = DEFAULT_N_CTX,
    peers: Sequence[str] = (),
    tls_dir: Path | None = None,
    insecure: bool = False,
    mdns: bool = True,
    rescan_seconds: float = 3.0,
) -> ApplianceApp:
    """The TUI over ``store_dir``. ``media``: bundle paths given on the command line;
    ``scan_roots``: where removable media are mounted (default /media, /run/media, /mnt);
    ``clock``: the time used for expiry checks (tests pin it); ``peers``, ``tls_dir``,
    ``insecure``, ``mdns``: how the Peers screen finds and talks to peers."""
    ctx = TuiContext(
        store_dir=Path(store_dir),
        clock=clock or utc_now,
        scan_roots=tuple(DEFAULT_SCAN_ROOTS if scan_roots is None else scan_roots),
        media_paths=[Path(p) for p in media],
        serve_listen=serve_listen,
        serve_ctx=serve_ctx,
        peer_urls=list(peers),
        peer_tls_dir=tls_dir,
        peer_insecure=insecure,
        peer_mdns=mdns,
        rescan_seconds=rescan_seconds,
    )
    prepare_spawning()
    app = ApplianceApp(ctx)
    app.title = f"appliance {__version__}"
    return app
