"""Peers screen (placeholder until wired): discovered peers, what they hold, pull."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from appliance.tui.base import Pane


class PeersPane(Pane):
    PANE_ID = "peers"
    TITLE = "Peers"
    HELP = "Hosts on the LAN that share models."
    BINDINGS: ClassVar[list[BindingType]] = [Binding("r", "reload", "Refresh")]

    def compose(self) -> ComposeResult:
        yield Static("peers", id="peers-status", classes="status")

    def action_reload(self) -> None:
        self.reload()
