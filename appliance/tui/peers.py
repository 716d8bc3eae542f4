"""Peers screen: peers on the LAN (site list, mDNS, typed), what each holds, and pulling
models from them with progress. Pulled bytes are checked against the signed manifest."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, ProgressBar, Static

from appliance.errors import UsageError
from appliance.peer.pull import PullResult
from appliance.tui import peering, service
from appliance.tui.base import (
    Field,
    FitTable,
    Pane,
    StoreChanged,
    TuiContext,
    add_plain_row,
)
from appliance.tui.explain import explain
from appliance.tui.progress import RateMeter


class PeersPane(Pane):
    PANE_ID = "peers"
    TITLE = "Peers"
    HELP = ("Other hosts of the site that share models: from the site config, found by mDNS, "
            "or typed. Pull fetches models from every peer that has them; each chunk is "
            "checked against the publisher's signature and a lying peer is dropped.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reload", "Refresh"),
        Binding("a", "add_peer", "Add peer"),
        Binding("p", "pull", "Pull"),
        Binding("c", "cancel", "Cancel"),
    ]

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(ctx)
        self.peers: list[peering.PeerView] = []
        self.results: list[PullResult] | None = None
        self.meter = RateMeter()

    def compose(self) -> ComposeResult:
        yield Static("Press r to look for peers.", id="peers-status", classes="status")
        yield FitTable(id="peers-table", shrink=(3, 0), cursor_type="row", zebra_stripes=True)
        yield ProgressBar(id="peers-progress", show_eta=False)
        yield Static("", id="peers-result", classes="status")

    def on_mount(self) -> None:
        self.query_one("#peers-table", DataTable).add_columns("peer", "from", "host", "holds")
        self.query_one("#peers-progress", ProgressBar).display = False

    def on_show(self) -> None:
        if not self.peers and not self.busy:
            self.reload()

    def show_error(self, error: BaseException) -> None:
        """Listing problems (no certificate, bad config) stay on the screen, not a dialog:
        visiting Peers must not interrupt an operator who does not use them."""
        self.last_error = error
        status = self.query_one("#peers-status", Static)
        if isinstance(error, UsageError):  # not set up for peers: the message says how
            status.update(f"[b yellow]Peers are not set up[/]: {escape(str(error))}")
            return
        e = explain(error)
        status.update(
            f"[b red]{e.title}[/]: {e.what}\nWhat to do: {e.next_step}\n"
            f"[dim]{escape(e.detail)}[/]")

    def settings(self) -> peering.PeerSettings:
        return peering.PeerSettings(tls_dir=self.ctx.peer_tls_dir,
                                    insecure=self.ctx.peer_insecure,
                                    extra_urls=tuple(self.ctx.peer_urls),
                                    mdns=self.ctx.peer_mdns)

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        store, settings = self.ctx.store_dir, self.settings()
        self.query_one("#peers-status", Static).update("looking for peers...")
        self.load(lambda: peering.list_peers(store, settings), self.show)

    def show(self, found: tuple[str, list[peering.PeerView]]) -> None:
        mode, peers = found
        self.peers = peers
        table = self.query_one("#peers-table", FitTable)
        table.clear()
        for p in peers:
            holds = p.problem or "; ".join(
                f"{s.channel} #{s.sequence}{'' if s.complete else ' (partial)'}: "
                + ", ".join(m.ref for m in s.models) for s in p.holds) or "nothing"
            add_plain_row(table, p.url, p.source, p.host or "?", holds, key=p.url)
        table.fit()
        reachable = sum(1 for p in peers if p.problem is None)
        self.query_one("#peers-status", Static).update(
            f"{len(peers)} peer(s), {reachable} reachable, {escape(mode)}. "
            + ("Press p to pull their models." if reachable else
               "Press a to add a peer's URL."))

    def action_add_peer(self) -> None:
        self.ask("Add a peer", [Field("url", "Peer URL", "https://host-b:8765")], self._added)

    def _added(self, values: dict[str, str]) -> None:
        if values["url"] not in self.ctx.peer_urls:
            self.ctx.peer_urls.append(values["url"])
            self.reload()

    def action_pull(self) -> None:
        reachable = [p for p in self.peers if p.problem is None]
        if not reachable:
            self.notify("no reachable peer: refresh (r) or add one (a)", severity="warning")
            return
        offered = sorted({m for p in reachable for m in p.models})
        urls = [p.url for p in reachable]
        self.ask("Pull models from peers",
                 [Field("models", "Models (NAME or NAME:VERSION, space separated; "
                        "empty: every model offered)", value=" ".join(offered),
                        required=False)],
                 lambda values: self._pull(urls, values),
                 f"From {len(reachable)} peer(s). Enter to start.")

    def _pull(self, urls: list[str], values: dict[str, str]) -> None:
        refs = values.get("models", "").split()
        store, settings, now = self.ctx.store_dir, self.settings(), self.now()
        bar = self.query_one("#peers-progress", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self.results = None
        self.meter.start()
        self.query_one("#peers-result", Static).update("authenticating the peers' manifests...")
        self.start_job(
            "pull",
            lambda job: peering.pull_models(store, settings, urls, refs, now=now,
                                            progress=job.progress, notify=job.note),
            self._pulled, failed=self._pull_failed,
        )

    def _pull_failed(self, error: BaseException) -> None:
        self.query_one("#peers-progress", ProgressBar).display = False
        self.query_one("#peers-result", Static).update("")
        # A dialog (unlike listing, the operator asked for this), then the form as typed.
        self.ask_again(error)

    def on_progress(self, done: int, total: int) -> None:
        self.query_one("#peers-progress", ProgressBar).update(total=max(1, total),
                                                              progress=done)
        self.query_one("#peers-result", Static).update(self.meter.text(done, total))

    def _pulled(self, results: list[PullResult]) -> None:
        self.results = results
        lines = []
        for r in results:
            fresh = [m for m in r.models if m not in r.present]
            lines.append(f"[green]{r.channel} #{r.sequence}[/]: pulled "
                         f"{', '.join(fresh) or 'nothing new'}; "
                         f"{service.size(r.bytes_fetched)} from peers, "
                         f"{service.size(r.bytes_local)} copied locally")
            lines += [f"  [yellow]dropped[/] {escape(u)}: {escape(why)}"
                      for u, why in r.dropped.items()]
        self.query_one("#peers-result", Static).update("\n".join(lines) or "nothing pulled")
        self.post_message(StoreChanged())

    def job_cancelled(self) -> None:
        self.query_one("#peers-progress", ProgressBar).display = False
        self.query_one("#peers-result", Static).update(
            "[yellow]pull cancelled[/]: verified chunks are kept; pull again to resume")

    def action_cancel(self) -> None:
        self.cancel_job()
