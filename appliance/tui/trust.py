"""Trust screen: the installed trust root (version, fingerprint, words, expiry, thresholds),
its keys with readable fingerprints, every installed version, the channel high-water marks,
and installing a root (first one by the paper fingerprint, newer ones by the rotation chain).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from appliance.format.trust import TrustRoot
from appliance.tui import service
from appliance.tui.base import Field, FitTable, Pane, StoreChanged, add_plain_row


class TrustPane(Pane):
    PANE_ID = "trust"
    TITLE = "Trust"
    HELP = ("The trust root says which publisher keys may sign bundles. Install the site's "
            "first root with the fingerprint printed at the signing ceremony; newer roots "
            "arrive on media and are accepted only through the rotation chain.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reload", "Refresh"),
        Binding("t", "install", "Install root"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("reading the trust root...", id="trust-summary", classes="status")
        yield FitTable(id="trust-keys", shrink=(1, 3, 4), cursor_type="row", zebra_stripes=True)
        yield Static("", id="trust-history", classes="status")

    def on_mount(self) -> None:
        table = self.query_one("#trust-keys", DataTable)
        table.add_columns("key", "id", "roles", "fingerprint words", "models")
        self.reload()

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        store, now = self.ctx.store_dir, self.now()
        self.load(lambda: service.trust_view(store, now), self.show)

    def show(self, view: service.TrustView | None) -> None:
        summary = self.query_one("#trust-summary", Static)
        table = self.query_one("#trust-keys", FitTable)
        history = self.query_one("#trust-history", Static)
        table.clear()
        if view is None:
            summary.update(
                "[b]No trust root installed.[/b] This host cannot check any bundle yet.\n"
                "Press [b]t[/b] to install the site's root file with the fingerprint from "
                "the signing ceremony's paper."
            )
            history.update("")
            return
        expired = " [b red]EXPIRED[/]" if view.expired else ""
        roles = "; ".join(f"{r}: {t} of {n} must sign" for r, t, n in view.thresholds)
        summary.update(
            f"[b]trust root v{view.version}[/b]  fingerprint [b]{view.fingerprint}[/b]\n"
            f"words {view.words}\n"
            f"created {view.created}  expires {view.expires}{expired}\n{roles}"
        )
        for key in view.keys:
            add_plain_row(table, key.name, key.key_id, "+".join(key.roles), key.words,
                          ", ".join(key.models) or "-", key=key.key_id)
        table.fit()
        lines = [f"installed v{i.version} {i.fingerprint} at {i.installed_at}"
                 for i in view.installed]
        lines += [f"channel {c.channel}: sequence {c.sequence} (since {c.updated_at})"
                  for c in view.channels]
        history.update("\n".join(lines))

    def action_install(self) -> None:
        carried = self.ctx.carried_roots
        fields = [
            Field("path", "Trust root file(s) (root-N.yaml; several: the rotation chain)",
                  "/media/usb/root-1.yaml", value=shlex.join(map(str, carried))),
            Field("fingerprint", "Fingerprint from the ceremony's paper (first root only)",
                  "3f2a-9b1c-...", required=False),
        ]
        where = ("The path offered is the root carried on the media. " if carried else "")
        self.ask("Install a trust root", fields, self._install,
                 f"{where}Type the fingerprint from the paper, never from the file.")

    def _install(self, values: dict[str, str]) -> None:
        store, now = self.ctx.store_dir, self.now()
        paths = root_paths(values["path"])
        self.start_job(
            "install trust root",
            lambda job: service.install_root(store, paths, values.get("fingerprint", ""), now),
            self._installed, failed=self.ask_again,
        )

    def _installed(self, root: TrustRoot) -> None:
        self.notify(f"trust root v{root.version} in force ({root.fingerprint})")
        self.post_message(StoreChanged())
        self.reload()


def root_paths(text: str) -> list[Path]:
    """The root files typed in the install dialog: one path (spaces allowed), or several
    separated by spaces (quote one that has spaces)."""
    whole = Path(text.strip()).expanduser()
    if whole.exists():
        return [whole]
    try:
        parts = shlex.split(text)
    except ValueError:  # an unbalanced quote: take the text as one path
        parts = [text.strip()]
    return [Path(p).expanduser() for p in parts]
