"""Audit screen: the store's hash-chained audit log, newest first, with the chain check."""

from __future__ import annotations

import json
from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from appliance.tui import service
from appliance.tui.base import FitTable, Pane, TuiContext, add_plain_row


class AuditPane(Pane):
    PANE_ID = "audit"
    TITLE = "Audit"
    HELP = ("Every import, refusal, override, trust change, deletion and server start, newest "
            "first. Each record holds the hash of the one before, so an edited, removed or "
            "reordered record breaks the chain, shown in red at the top.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reload", "Refresh + check"),
        Binding("enter", "details", "Details", show=False),
    ]

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(ctx)
        self.view: service.AuditView | None = None

    def compose(self) -> ComposeResult:
        yield Static("reading the audit log...", id="audit-status", classes="status")
        yield FitTable(id="audit-table", shrink=(3,), cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one("#audit-table", DataTable).add_columns("#", "time", "kind", "details")
        self.reload()

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        store = self.ctx.store_dir
        self.load(lambda: service.audit_view(store), self.show)

    def show(self, view: service.AuditView) -> None:
        self.view = view
        status = self.query_one("#audit-status", Static)
        count = len(view.records)
        if view.chain_ok:
            status.update(f"[green]chain intact[/]: {count} record(s), newest first")
        else:
            status.update(f"[b red]CHAIN BROKEN[/]: {escape(view.chain_problem or '')}\n"
                          "Report this to the site's security officer; keep the store as it is.")
        table = self.query_one("#audit-table", FitTable)
        table.clear()
        for record in view.records:
            add_plain_row(table, str(record.seq), record.time.replace("+00:00", "Z"), record.kind,
                          service.describe_record(record), key=str(record.seq))
        table.fit()

    def action_details(self) -> None:
        table = self.query_one("#audit-table", DataTable)
        if self.view is None or not self.view.records or table.cursor_row < 0:
            return
        record = self.view.records[table.cursor_row]
        self.notify(json.dumps(record.to_json(), indent=1, sort_keys=True), timeout=15,
                    title=f"audit record {record.seq}")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()
