"""Media screen: bundles found on mounted removable media, refreshed as media come and go.

Scans the mount roots (/media, /run/media, /mnt by default) a few levels deep, plus the paths
given with ``--media`` or typed by the operator, every few seconds in a worker thread. What is
shown here is what the media *claims* (unverified); trust is decided on the Inspect screen.
"""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from appliance.tui import service
from appliance.tui.base import (
    BundleChosen,
    Field,
    FitTable,
    Pane,
    TuiContext,
    add_plain_row,
    existing_dir,
)


class MediaPane(Pane):
    PANE_ID = "media"
    TITLE = "Media"
    HELP = ("Bundles on mounted removable media (and paths you typed). The list refreshes "
            "when media are inserted or removed. What is shown is unverified until Inspect.")
    BINDINGS: ClassVar[list[BindingType]] = [
        # priority: ahead of the list's own Enter, so the footer names what Enter does here
        Binding("enter", "choose", "Inspect", priority=True),
        Binding("o", "open_path", "Open path"),
        Binding("r", "reload", "Rescan"),
    ]

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(ctx)
        self.found: list[service.MediaCandidate] = []

    def compose(self) -> ComposeResult:
        yield Static("looking for media...", id="media-status", classes="status")
        yield FitTable(id="media-table", shrink=(4, 3, 0), cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one("#media-table", DataTable)
        table.add_columns("channel #seq", "volumes", "size", "models", "path")
        self.reload()
        self.set_interval(self.ctx.rescan_seconds, self.reload)

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        roots, extra = self.ctx.scan_roots, tuple(self.ctx.media_paths)
        self.load(lambda: service.scan_media(roots, extra), self.show)

    def show(self, found: list[service.MediaCandidate]) -> None:
        if found == self.found and self.query_one("#media-table", DataTable).row_count:
            return  # nothing came or went: keep the cursor where the operator left it
        self.found = found
        if not self.ctx.selected:  # until a bundle is chosen, offer the roots of one found
            self.ctx.carried_roots = next((c.root_files for c in found if c.root_files), ())
        table = self.query_one("#media-table", FitTable)
        table.clear()
        for c in found:
            if c.problem:
                add_plain_row(table, "?", "?", "?", c.problem, str(c.path), key=str(c.path))
                continue
            add_plain_row(table, f"{c.channel} #{c.sequence}",
                          f"{len(c.volumes)} of {c.volume_count}", service.size(c.total_bytes),
                          ", ".join(c.models), str(c.path), key=str(c.path))
        table.fit()
        roots = ", ".join(str(r) for r in self.ctx.scan_roots)
        where = (f"scanning {escape(roots)}" if roots else
                 "no mount roots to scan: only paths given or typed")
        status = self.query_one("#media-status", Static)
        if found:
            status.update(f"{len(found)} bundle(s) found ({where}). Select one and "
                          "press Enter to inspect it.")
        elif roots:
            status.update(f"No bundle found under {escape(roots)}. Insert the media, or "
                          "press o to type the bundle's path.")
        else:
            status.update("No bundle found (no mount roots configured, and no path given). "
                          "Press o to type the bundle's path.")

    def action_choose(self) -> None:
        table = self.query_one("#media-table", DataTable)
        if not self.found or table.cursor_row < 0:
            self.notify("no bundle selected", severity="warning")
            return
        chosen = self.found[min(table.cursor_row, len(self.found) - 1)]
        self.post_message(BundleChosen([chosen.path]))

    def action_open_path(self) -> None:
        self.ask("Open a bundle", [Field("path", "Bundle or volume directory",
                                         "/media/usb/bundle")], self._opened)

    def _opened(self, values: dict[str, str]) -> None:
        path = existing_dir(values["path"])
        if path not in self.ctx.media_paths:
            self.ctx.media_paths.append(path)
        self.reload()
        self.post_message(BundleChosen([path]))
