"""Inspect screen: what a bundle holds and who signed it, then every byte checked.

Opening authenticates the bundle against this host's trust root (signatures over the exact
manifest bytes, the carried rotation chain, publisher scopes, expiry) before showing anything
from the manifest as checked; the rollback rule is checked against the store's channel
high-water mark. On a host that trusts no root yet the bundle's claims are shown marked
UNVERIFIED (as ``appliance bundle inspect`` without ``--trust`` does), so its signers can be
looked at before the root is installed; nothing can be verified or imported until then.
``i`` starts the import at once (it checks every chunk itself; verifying first is optional).
Verify reads every chunk of every volume present, with progress per volume, and asks for the
volumes that are missing.
"""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, ProgressBar, Static

from appliance.bundle.verify import VerifyReport
from appliance.errors import ExpiredError
from appliance.format.fields import format_timestamp
from appliance.tui import service
from appliance.tui.base import (
    Field,
    FitTable,
    ImportWanted,
    PromptScreen,
    TuiContext,
    VolumePane,
    add_plain_row,
)
from appliance.tui.explain import explain
from appliance.tui.progress import RateMeter


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = width if total == 0 else round(width * done / total)
    return "#" * filled + "." * (width - filled)


class InspectPane(VolumePane):
    PANE_ID = "inspect"
    TITLE = "Inspect"
    HELP = ("The chosen bundle after its signatures were checked against this host's trust "
            "root: models with their GGUF facts, signers with fingerprint words, channel, "
            "sequence, expiry and trust-root updates it carries. v verifies every byte; i "
            "imports (checking every chunk too). Before a root is installed the bundle's "
            "claims are shown UNVERIFIED.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "verify", "Verify"),
        Binding("i", "import", "Import"),
        Binding("a", "add_volume", "Add volume"),
        Binding("e", "allow_expired", "Allow expired"),
        Binding("c", "cancel", "Cancel"),
    ]

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(ctx)
        self.view: service.InspectView | None = None
        self.verified: VerifyReport | None = None
        self.meter = RateMeter()
        self._verifying: tuple[int, int] | None = None  # (done, total) while verify runs

    def compose(self) -> ComposeResult:
        yield Static("No bundle chosen: pick one on the Media screen (1).", id="inspect-summary",
                     classes="status")
        yield FitTable(id="inspect-models", shrink=(7, 0, 3), cursor_type="row", zebra_stripes=True)
        yield ProgressBar(id="inspect-progress", show_eta=False)
        yield Static("", id="inspect-volumes", classes="status")

    def on_mount(self) -> None:
        self.query_one("#inspect-models", DataTable).add_columns(
            "model", "version", "size", "arch", "quant", "params", "ctx", "license")
        self.query_one("#inspect-progress", ProgressBar).display = False

    def reload(self) -> None:
        if not self.ctx.selected:
            return
        store, now, paths = self.ctx.store_dir, self.now(), self.ctx.selected
        allow = self.ctx.override_reason is not None
        self.view = None
        self.verified = None
        self._verifying = None
        self.query_one("#inspect-progress", ProgressBar).display = False
        self.query_one("#inspect-summary", Static).update(
            f"checking signatures of {escape(', '.join(map(str, paths)))}...")
        self.query_one("#inspect-models", DataTable).clear()
        self.query_one("#inspect-volumes", Static).update("")
        self.load(lambda: service.inspect_media(store, paths, now, allow_expired=allow),
                  self.show)

    def show_error(self, error: BaseException) -> None:
        summary = self.query_one("#inspect-summary", Static)
        hint = (" Press e to accept it anyway with a reason." if isinstance(error, ExpiredError)
                else "")
        e = explain(error)  # a mistyped path is "check the input", not a security refusal
        colour = "red" if e.refused else "yellow"
        said = "" if e.refused else f": {escape(str(error))}"
        summary.update(f"[b {colour}]{escape(e.title)}[/]{said}.{hint}")
        super().show_error(error)

    def show(self, view: service.InspectView) -> None:
        self.view = view
        if view.root_files:
            self.ctx.carried_roots = view.root_files
        m = view.manifest
        lines = [f"[b]{escape(m.channel)} #{m.sequence}[/b]  "
                 f"created {format_timestamp(m.created)}  expires {format_timestamp(m.expires)}"
                 + (" [b red]EXPIRED (override: reason recorded)[/]" if view.expired else "")]
        if not view.verified:
            lines.append("[b red]UNVERIFIED[/]: no trust root on this host; nothing here "
                         "is checked yet")
        claimed = "" if view.verified else "claims "
        for s in view.signers:
            lines.append(f"{claimed}signed by {escape(s.label)}  [i]{s.words}[/i]")
        if not view.verified and view.root_files:
            names = ", ".join(p.name for p in view.root_files)
            lines.append(f"carries {escape(names)}: install it on Trust (7), key t")
        elif view.trust_to > view.trust_from:
            lines.append(f"[b]trust root update[/b]: v{view.trust_from} -> v{view.trust_to} "
                         "will be installed with this bundle")
        if view.rollback:
            lines.append(f"[b red]rollback[/]: {view.rollback}; import will be refused")
        self.query_one("#inspect-summary", Static).update("\n".join(lines))
        table = self.query_one("#inspect-models", FitTable)
        table.clear()
        for model in m.models:
            g = model.gguf
            add_plain_row(table,
                model.name, model.version, service.size(model.size),
                g.architecture if g else "-", (g.quantization or "-") if g else "-",
                f"{g.parameter_count:,}" if g and g.parameter_count else "-",
                str(g.context_length) if g and g.context_length else "-", model.license,
            )
        table.fit()
        self._show_volumes(0)

    def _show_volumes(self, done: int) -> None:
        view = self.view
        if view is None:
            return
        lines = []
        if self._verifying is not None:
            lines.append(f"verifying: {self.meter.text(*self._verifying)}")
        lines += [f"{name} {_bar(d, t)} {service.size(d)} of {service.size(t)}"
                  for name, d, t in service.per_volume(done, view.volume_sizes)]
        if view.volumes_missing:
            lines.append(f"[b yellow]missing[/]: {', '.join(view.volumes_missing)}: insert "
                         "the next volume and press a to add its path")
        if self.verified is not None:
            r = self.verified
            lines.append(f"[green]verified[/]: {r.chunks_verified} chunks, "
                         f"{service.size(r.plain_bytes)}"
                         + ("" if r.complete else " (volumes present only)"))
        self.query_one("#inspect-volumes", Static).update("\n".join(lines))

    # -- verify --------------------------------------------------------------------------

    def action_verify(self) -> None:
        if self.view is None:
            self.notify("open a bundle first (Media screen, Enter)", severity="warning")
            return
        store, now, paths = self.ctx.store_dir, self.now(), self.ctx.selected
        allow = self.ctx.override_reason is not None
        if self.busy:
            self.notify("verification is running: c cancels it", severity="warning")
            return
        bar = self.query_one("#inspect-progress", ProgressBar)
        bar.display = True
        total = max(1, sum(t for _, t in self.view.volume_sizes))
        bar.update(total=total, progress=0)
        self.meter.start()
        self._verifying = (0, total)
        self.start_job(
            "verify",
            lambda job: service.verify(store, paths, now, progress=job.progress,
                                       allow_expired=allow),
            self._verified, failed=self._verify_failed,
        )

    def on_progress(self, done: int, total: int) -> None:
        self.query_one("#inspect-progress", ProgressBar).update(total=max(1, total),
                                                                 progress=done)
        self._verifying = (done, total)
        self._show_volumes(done)

    def _verified(self, report: VerifyReport) -> None:
        self.verified = report
        self._verifying = None
        self._show_volumes(report.stored_bytes)
        if report.rebuilt:
            self.notify(f"rebuilt from parity: {', '.join(report.rebuilt)}")
        if report.complete:
            self.notify("every byte verified: press i to import")
        else:
            self.notify(f"volumes present verified; still needed: "
                        f"{', '.join(report.volumes_missing)}", severity="warning")

    def _verify_failed(self, error: BaseException) -> None:
        self._verifying = None
        self.query_one("#inspect-progress", ProgressBar).display = False
        self.query_one("#inspect-volumes", Static).update(
            f"[b red]verification failed[/]: {escape(explain(error).title)}")
        super().show_error(error)

    def job_cancelled(self) -> None:
        self._verifying = None
        self.query_one("#inspect-progress", ProgressBar).display = False
        self._show_volumes(0)

    def action_cancel(self) -> None:
        self.cancel_job()

    # -- the rest ------------------------------------------------------------------------

    def action_import(self) -> None:
        if self.view is None:
            self.notify("open a bundle first (Media screen, Enter)", severity="warning")
            return
        if not self.view.verified:
            self.notify("install the site's trust root first (Trust, 7): nothing can be "
                        "imported unverified", severity="warning")
            return
        if self.busy:  # the import checks every chunk itself: verifying first is optional
            self.cancel_job()
        self.post_message(ImportWanted())

    def action_allow_expired(self) -> None:
        self.app.push_screen(
            PromptScreen(
                "Accept an expired bundle",
                [Field("reason", "Reason (recorded in the audit log with your user name)",
                       "e.g. site offline since May, publisher confirmed by phone")],
                "Only do this when you know why the bundle is past its expiry. The override, "
                "your reason and the host's clock are written to the audit log.",
            ),
            self._override,
        )

    def _override(self, values: dict[str, str] | None) -> None:
        reason = service.override_reason((values or {}).get("reason"))
        if reason is None:
            return
        self.ctx.override_reason = reason
        self.notify("expiry override armed for this bundle; the reason goes to the audit log")
        self.reload()
