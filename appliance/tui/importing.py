"""Import screen: media -> store with progress, throughput and time left, cancel and resume.

``appliance.importer.import_media`` does the work (authenticate, rollback check, plan,
per-chunk verified writes, publish); cancelling stops it at its next progress report and
everything already written stays durable, so importing again resumes. Chunks on volumes not
inserted are left for a later run: the screen names the volumes still needed. An expired
bundle is imported only with a typed reason, which the importer records in the audit log.
"""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import ProgressBar, Static

from appliance.bundle.parity_rebuild import import_media_with_parity
from appliance.errors import ExpiredError
from appliance.importer import ImportResult
from appliance.tui import service
from appliance.tui.base import Field, PromptScreen, StoreChanged, TuiContext, VolumePane
from appliance.tui.explain import explain
from appliance.tui.progress import RateMeter


class ImportPane(VolumePane):
    PANE_ID = "import"
    TITLE = "Import"
    HELP = ("Copies the chosen bundle into the store, checking every chunk against the signed "
            "manifest. Cancel any time; importing again resumes. A model appears on the "
            "Models screen only when all its bytes are verified.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("i", "start", "Import"),
        Binding("c", "cancel", "Cancel"),
        Binding("a", "add_volume", "Add volume"),
        Binding("e", "allow_expired", "Allow expired"),
    ]

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(ctx)
        self.result: ImportResult | None = None
        self.meter = RateMeter()
        self._reported = False

    def compose(self) -> ComposeResult:
        yield Static("", id="import-bundle", classes="status")
        yield ProgressBar(id="import-progress", show_eta=False)
        yield Static("", id="import-rate", classes="status")
        yield Static("", id="import-result")

    def on_mount(self) -> None:
        # No bar until an import runs: an idle bar animates as if something were busy.
        self.query_one("#import-progress", ProgressBar).display = False
        self.reload()

    def reload(self) -> None:
        bundle = self.query_one("#import-bundle", Static)
        if not self.ctx.selected:
            bundle.update("No bundle chosen: pick one on the Media screen (1), check it on "
                          "Inspect (2), then come back and press i.")
            return
        override = (f"\n[b yellow]expiry override[/]: {escape(self.ctx.override_reason)}"
                    if self.ctx.override_reason else "")
        bundle.update(f"bundle: {escape(', '.join(map(str, self.ctx.selected)))}{override}\n"
                      "Press i to import, c to cancel.")

    def action_start(self) -> None:
        if not self.ctx.selected:
            self.notify("choose a bundle on the Media screen first", severity="warning")
            return
        store, now, paths = self.ctx.store_dir, self.now(), self.ctx.selected
        reason = self.ctx.override_reason
        if self.busy:
            self.notify("the import is running: c cancels it", severity="warning")
            return
        self.result = None
        self.meter.start()
        self._reported = False
        bar = self.query_one("#import-progress", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self.query_one("#import-result", Static).update("authenticating the bundle...")
        self.query_one("#import-rate", Static).update("")
        self.start_job(
            "import",
            lambda job: import_media_with_parity(store, list(paths), now=now,
                                     allow_expired=reason is not None, reason=reason,
                                     progress=job.progress),
            self._done, failed=self._failed,
        )

    def on_progress(self, done: int, total: int) -> None:
        bar = self.query_one("#import-progress", ProgressBar)
        bar.update(total=max(1, total), progress=done)
        if not self._reported:
            self._reported = True
            self.query_one("#import-result", Static).update("importing...")
        self.query_one("#import-rate", Static).update(self.meter.text(done, total))

    def _done(self, result: ImportResult) -> None:
        self.result = result
        bar = self.query_one("#import-progress", ProgressBar)
        bar.update(total=max(1, result.total_bytes),
                   progress=result.total_bytes if result.complete else bar.progress)
        lines = [f"[b]{result.channel} #{result.sequence}[/b] "
                 + ("[green]imported completely[/]" if result.complete else
                    "[yellow]imported in part[/]")]
        if result.published:
            lines.append(f"published: {', '.join(result.published)}")
        if result.present:
            lines.append(f"already in the store: {', '.join(result.present)}")
        if result.pending:
            lines.append(f"still incomplete: {', '.join(result.pending)}")
        if result.volumes_needed:
            lines.append(f"[b yellow]insert[/] {', '.join(result.volumes_needed)}, press a to "
                         "add its path, then i to resume")
        lines.append(f"read {service.size(result.media_bytes)} from media, copied "
                     f"{service.size(result.local_bytes)} already held, "
                     f"in {result.seconds:.1f} s")
        if result.complete:
            lines.append("next: Models (4) lists it; Serve (6) starts it and lets you try it")
        if result.expired_override:
            lines.append("expired bundle accepted: your reason is in the audit log")
        if result.rebuilt:
            lines.append(f"rebuilt from parity: {', '.join(result.rebuilt)}")
        self.query_one("#import-result", Static).update("\n".join(lines))
        self.notify("import finished" if result.complete else "import partial")
        self.post_message(StoreChanged())

    def _failed(self, error: BaseException) -> None:
        self.query_one("#import-progress", ProgressBar).display = False
        self.query_one("#import-rate", Static).update("")
        e = explain(error)
        hint = ("\nPress e to accept it anyway with a reason."
                if isinstance(error, ExpiredError) else "")
        self.query_one("#import-result", Static).update(
            f"[b red]{e.title}[/]\n{e.next_step}{hint}")
        self.post_message(StoreChanged())  # refusals are audited
        self.show_error(error)

    def job_cancelled(self) -> None:
        self.query_one("#import-progress", ProgressBar).display = False
        self.query_one("#import-result", Static).update(
            "[yellow]import cancelled[/]: what was written is kept; press i to resume")

    def action_cancel(self) -> None:
        self.cancel_job()

    def action_allow_expired(self) -> None:
        self.app.push_screen(
            PromptScreen(
                "Import an expired bundle",
                [Field("reason", "Reason (recorded in the audit log with your user name)",
                       "e.g. site offline since May, publisher confirmed by phone")],
                "Only do this when you know why the bundle is past its expiry.",
            ),
            self._override,
        )

    def _override(self, values: dict[str, str] | None) -> None:
        reason = service.override_reason((values or {}).get("reason"))
        if reason is not None:
            self.ctx.override_reason = reason
            self.reload()
