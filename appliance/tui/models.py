"""Models screen: what the store holds, with provenance and verified state; delete with
confirmation; re-verify every byte (a file that no longer matches is quarantined)."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, ProgressBar, Static

from appliance.store.records import ModelRecord
from appliance.store.scrub import VerifyReport
from appliance.tui import service
from appliance.tui.base import (
    ConfirmScreen,
    FitTable,
    Pane,
    StoreChanged,
    TuiContext,
    add_plain_row,
)
from appliance.tui.progress import RateMeter


def describe_model(m: ModelRecord) -> str:
    prov = m.provenance or {}
    sources = "; ".join(f"{s.get('path')}: {s.get('source')}" for s in prov.get("sources", []))
    g = m.gguf or {}
    facts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in g.items()
                      if v is not None and k not in ("tensor_count", "chat_template_hash"))
    state = ("[green]verified[/]" if m.verified else "[b red]NOT verified (quarantined)[/]")
    return (f"[b]{m.ref}[/b] {state} (last {_time(m.verified_at)})  "
            f"license {escape(m.license)}\n"
            f"bundle {m.channel} #{m.sequence}  signers {', '.join(m.signers) or '-'}\n"
            + escape(f"built by {prov.get('builder', '-')}  {sources}\n{facts}"))


def _time(stamp: str | None) -> str:
    return stamp.replace("+00:00", "Z") if stamp else "-"


class ModelsPane(Pane):
    PANE_ID = "models"
    TITLE = "Models"
    HELP = ("The models in this host's store. Only models whose every byte was verified are "
            "listed as verified and can be served. Re-verify re-hashes every file; one that "
            "changed is quarantined, never deleted.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reload", "Refresh"),
        Binding("d", "delete", "Delete"),
        Binding("v", "verify", "Re-verify"),
        Binding("c", "cancel", "Cancel"),
    ]

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(ctx)
        self.models: list[ModelRecord] = []
        self.meter = RateMeter()

    def compose(self) -> ComposeResult:
        yield FitTable(id="models-table", shrink=(5, 4, 0), cursor_type="row", zebra_stripes=True)
        yield ProgressBar(id="models-progress", show_eta=False)
        yield Static("", id="models-rate", classes="status")
        yield Static("", id="models-detail", classes="status")

    def on_mount(self) -> None:
        self.query_one("#models-table", DataTable).add_columns(
            "name", "version", "size", "verified", "channel #seq", "imported")
        self.query_one("#models-progress", ProgressBar).display = False
        self.query_one("#models-rate", Static).display = False  # shown while re-verifying
        self.reload()

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        store = self.ctx.store_dir
        self.load(lambda: service.models(store), self.show)

    def show(self, models: list[ModelRecord]) -> None:
        self.models = models
        table = self.query_one("#models-table", FitTable)
        table.clear()
        for m in models:
            add_plain_row(table, m.name, m.version, service.size(m.size),
                          "yes" if m.verified else "NO (quarantined)",
                          f"{m.channel} #{m.sequence}", _time(m.imported_at), key=m.ref)
        table.fit()
        detail = self.query_one("#models-detail", Static)
        if not models:
            detail.update("The store holds no model yet: import a bundle (screens 1-3).")
        else:
            self._detail(min(max(table.cursor_row, 0), len(models) - 1))

    def _detail(self, row: int) -> None:
        if 0 <= row < len(self.models):
            self.query_one("#models-detail", Static).update(describe_model(self.models[row]))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail(event.cursor_row)

    def selected(self) -> ModelRecord | None:
        row = self.query_one("#models-table", DataTable).cursor_row
        return self.models[row] if 0 <= row < len(self.models) else None

    def action_delete(self) -> None:
        model = self.selected()
        if model is None:
            self.notify("no model selected", severity="warning")
            return
        self.app.push_screen(
            ConfirmScreen(f"Delete {model.ref} ({service.size(model.size)}) from the store?\n"
                          "Its files are removed; the deletion is recorded in the audit log."),
            lambda yes: self._delete(model.ref) if yes else None,
        )

    def _delete(self, ref: str) -> None:
        store, now = self.ctx.store_dir, self.now()
        self.start_job("delete", lambda job: service.remove_model(store, ref, now),
                       self._deleted)

    def _deleted(self, model: ModelRecord) -> None:
        self.notify(f"deleted {model.ref}")
        self.post_message(StoreChanged())

    def action_verify(self) -> None:
        store = self.ctx.store_dir
        bar = self.query_one("#models-progress", ProgressBar)
        if self.busy:
            self.notify("a job is running: c cancels it", severity="warning")
            return
        bar.display = True
        bar.update(total=None, progress=0)
        self.query_one("#models-rate", Static).display = True
        self.meter.start()
        self.start_job("re-verify",
                       lambda job: service.verify_store(store, progress=job.progress),
                       self._verified)

    def on_progress(self, done: int, total: int) -> None:
        self.query_one("#models-progress", ProgressBar).update(total=max(1, total),
                                                               progress=done)
        self.query_one("#models-rate", Static).update(
            f"re-verifying: {self.meter.text(done, total)}")

    def _verified(self, report: VerifyReport) -> None:
        self.query_one("#models-progress", ProgressBar).display = False
        self.query_one("#models-rate", Static).display = False
        if report.ok:
            self.notify(f"all {report.files_checked} file(s) verified "
                        f"({service.size(report.bytes_checked)})")
        else:
            names = ", ".join(f"{c.model}:{c.version}/{c.path}" for c in report.corrupt)
            self.notify(f"quarantined: {names}", severity="error", timeout=15)
        self.post_message(StoreChanged())

    def job_cancelled(self) -> None:
        self.query_one("#models-progress", ProgressBar).display = False
        self.query_one("#models-rate", Static).display = False

    def action_cancel(self) -> None:
        self.cancel_job()
