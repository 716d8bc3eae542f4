"""What every TUI screen shares: the app context, the pane base class with its job runner,
the cross-screen messages, and forms that keep what was typed (the dialogs themselves are in
``appliance.tui.dialogs``; re-exported here).

A ``Pane`` is one of the eight screens shown in the tab switcher. It never calls the library
on the UI thread: ``load`` (quick reads, the newest replaces the previous) and ``start_job``
(long work with progress and cancel, one at a time) run a function in a thread worker and hand
its result back on the UI thread. Failures become an ``Explanation`` (``appliance.tui.explain``)
shown in plain words.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable
from textual.worker import Worker, get_current_worker

from appliance.errors import ApplianceError, UsageError
from appliance.serve.model import DEFAULT_N_CTX
from appliance.tui.dialogs import ConfirmScreen, ExplainScreen, Field, PromptScreen
from appliance.tui.explain import explain
from appliance.tui.service import DEFAULT_SCAN_ROOTS, Cancelled, cancellable

__all__ = ["BundleChosen", "Clock", "ConfirmScreen", "ExplainScreen", "Field", "FitTable",
           "ImportWanted", "Job", "Pane", "PromptScreen", "StoreChanged", "TuiContext",
           "VolumePane", "add_plain_row", "existing_dir", "pane_bindings", "utc_now"]

Clock = Callable[[], datetime]
Progress = Callable[[int, int], None]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class TuiContext:
    """What the screens share: the store, the clock, where to look for media."""

    store_dir: Path
    clock: Clock = utc_now
    scan_roots: tuple[Path, ...] = DEFAULT_SCAN_ROOTS
    media_paths: list[Path] = field(default_factory=list)  # typed by the operator / --media
    rescan_seconds: float = 3.0  # how often the Media screen looks for inserted media
    selected: tuple[Path, ...] = ()  # the bundle being inspected / imported
    override_reason: str | None = None  # typed reason to accept the selected expired bundle
    serve_listen: str = "127.0.0.1:0"
    peer_urls: list[str] = field(default_factory=list)  # typed by the operator / --peer
    peer_tls_dir: Path | None = None
    peer_insecure: bool = False
    peer_mdns: bool = True
    serve_ctx: int = DEFAULT_N_CTX
    # Trust-root files carried on the media seen (the inspected bundle's first): what the
    # Trust screen's install dialog offers.
    carried_roots: tuple[Path, ...] = ()


# --- messages between screens ------------------------------------------------------------


class BundleChosen(Message):
    """The operator picked a bundle (volume paths) on the Media screen."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self.paths = tuple(paths)


class ImportWanted(Message):
    """Go to the Import screen with the current bundle and start importing it."""


class StoreChanged(Message):
    """The store changed (import, delete, trust install): screens showing it reload."""


# --- job plumbing ------------------------------------------------------------------------


class Job:
    """Handed to a job function in its worker thread: progress out, cancel in."""

    def __init__(self, pane: Pane, worker: Worker[Any]) -> None:
        self._pane = pane
        self._worker = worker
        self._last = 0.0

    def cancelled(self) -> bool:
        return self._worker.is_cancelled

    def report(self, done: int, total: int) -> None:
        """Throttled: at most ~10 UI updates a second, and always the last one."""
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        self._pane.call_ui(self._pane.on_progress, done, total)

    @property
    def progress(self) -> Progress:
        """A library progress callback that also stops the job when cancelled."""
        return cancellable(self.report, self.cancelled)

    def note(self, text: str) -> None:
        self._pane.call_ui(self._pane.on_note, text)


class Pane(Vertical):
    """One screen of the switcher. Subclasses set ``PANE_ID``, ``TITLE``, ``BINDINGS``."""

    # Focusable so a screen without focusable widgets still receives its key bindings.
    can_focus = True
    PANE_ID: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""
    HELP: ClassVar[str] = ""
    DEFAULT_CSS = """
    Pane { height: 1fr; }
    Pane .title { text-style: bold; height: 1; }
    Pane .status { height: auto; max-height: 6; color: $text-muted; }
    Pane .problem { height: auto; color: $error; }
    Pane DataTable { height: 1fr; }
    """

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(id=f"pane-{self.PANE_ID}")
        self.ctx = ctx
        self.job: Worker[Any] | None = None
        self.last_error: BaseException | None = None  # the newest failure shown (tests read it)
        self._asked: tuple[_Form, dict[str, str]] | None = None  # the last form submitted

    # -- for subclasses ------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read what the screen shows (called when shown and after store changes)."""

    def on_progress(self, done: int, total: int) -> None:
        """A running job's progress, on the UI thread."""

    def on_note(self, text: str) -> None:
        """A running job's remark, on the UI thread."""
        self.notify(text)

    def focus_first(self) -> None:
        """Put the focus inside this pane so its key bindings are active."""
        for widget in self.query("*"):
            if widget.focusable:
                widget.focus()
                return
        self.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Cancel is offered (in the footer too) only while there is something to cancel:
        # at 80 columns every key shown takes room from another.
        # Textual: False hides the key (None would show it greyed out).
        return action != "cancel" or self.busy

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.refresh_bindings()

    # -- plumbing ------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.ctx.clock()

    def call_ui(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` on the UI thread, unless this screen has gone meanwhile (the app
        quitting while a thread worked: its widgets may already be removed)."""
        def if_still_here() -> None:
            if self.is_attached:
                callback(*args)

        # RuntimeError: the app is shutting down, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.app.call_from_thread(if_still_here)

    def load(self, fn: Callable[[], Any], done: Callable[[Any], None], *,
             group: str = "load") -> None:
        """Run quick work in a thread; a newer one in the same group replaces (and silences)
        a running one."""
        self.run_worker(partial(self._load_body, fn, done), thread=True, exclusive=True,
                        group=group, name=group)

    def _load_body(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        worker = get_current_worker()
        try:
            result = fn()
        except Exception as e:
            if not worker.is_cancelled:
                self.call_ui(self.show_error, e)
            return
        if not worker.is_cancelled:
            self.call_ui(done, result)

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.is_running

    def start_job(self, title: str, fn: Callable[[Job], Any], done: Callable[[Any], None],
                  *, failed: Callable[[BaseException], None] | None = None) -> bool:
        """Start long work (one per screen); False if one is running."""
        if self.busy:
            self.notify(f"{title}: wait for the running job, or cancel it (c)",
                        severity="warning")
            return False
        self.job = self._job_worker(title, fn, done, failed)
        return True

    @work(thread=True, group="job")
    def _job_worker(self, title: str, fn: Callable[[Job], Any], done: Callable[[Any], None],
                    failed: Callable[[BaseException], None] | None) -> None:
        worker = get_current_worker()
        try:
            result = fn(Job(self, worker))
        except Cancelled:
            self.call_ui(self._job_cancelled, title)
            return
        except Exception as e:
            self.call_ui(failed or self.show_error, e)
            return
        self.call_ui(done, result)

    def _job_cancelled(self, title: str) -> None:
        self.notify(f"{title} cancelled", severity="warning")
        self.job_cancelled()

    def job_cancelled(self) -> None:
        """The job stopped on the operator's request (UI thread)."""

    def cancel_job(self) -> None:
        if self.busy and self.job is not None:
            self.job.cancel()
            self.notify("cancelling...")
        else:
            self.notify("nothing to cancel")

    def show_error(self, error: BaseException) -> None:
        self.last_error = error
        self.app.push_screen(ExplainScreen(explain(error)))

    # -- forms that keep what was typed --------------------------------------------------

    def ask(self, title: str, fields: Sequence[Field], then: Callable[[dict[str, str]], None],
            explanation: str = "", *, typed: dict[str, str] | None = None,
            problem: str = "") -> None:
        """A form that keeps what was typed: when ``then`` raises an ApplianceError (or a job
        it started fails into ``ask_again``), the error is explained and the form comes back
        with the values as typed and the problem under them."""
        form = _Form(title, tuple(fields), then, explanation)
        shown = [replace(f, value=(typed or {}).get(f.name, f.value)) for f in fields]
        self.app.push_screen(PromptScreen(title, shown, explanation, problem=problem),
                             partial(self._form_answered, form))

    def _form_answered(self, form: _Form, values: dict[str, str] | None) -> None:
        if values is None:
            return
        self._asked = (form, values)
        try:
            form.then(values)
        except ApplianceError as e:
            self.ask_again(e)

    def ask_again(self, error: BaseException) -> None:
        """Explain ``error``, then reopen the last form with the values typed into it."""
        self.last_error = error
        explanation = explain(error)
        if self._asked is None:
            self.app.push_screen(ExplainScreen(explanation))
            return
        form, values = self._asked
        self.app.push_screen(
            ExplainScreen(explanation),
            lambda _: self.ask(form.title, form.fields, form.then, form.explanation,
                               typed=values, problem=f"{explanation.title}: correct it, or "
                               "Esc to give up"),
        )


def existing_dir(typed: str) -> Path:
    """A directory the operator typed; UsageError (the form comes back) when it is not one."""
    path = Path(typed).expanduser()
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory: check the path (the bundle's directory "
                         "or one of its vol-NNN volumes)")
    return path


def add_plain_row(table: DataTable[Any], *cells: object, key: str | None = None) -> None:
    """A row whose text is shown as is: DataTable would read ``[...]`` in a str as markup,
    and paths, audit details and peer answers are not ours to style (or to break). A cell
    cut to its column's width ends in an ellipsis (``FitTable``)."""
    table.add_row(*(Text(c, no_wrap=True, overflow="ellipsis") if isinstance(c, str) else c
                    for c in cells), key=key)


def _cell_width(cell: object) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(str(cell))


class FitTable(DataTable[Any]):
    """A table whose columns never run past its right edge unseen: when the rows are wider
    than the table, the ``shrink`` columns (by index, the first given gives first) narrow
    to make room, down to their label's width, and their cut cells end in an ellipsis.
    Call ``fit`` after filling it; it refits itself when resized."""

    def __init__(self, *, shrink: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shrink_order = tuple(shrink)

    def on_resize(self) -> None:
        self.fit()

    def fit(self) -> None:
        columns = list(self.columns.values())
        room = self.scrollable_content_region.width - 2 * self.cell_padding * len(columns)
        if not columns or room <= 0:
            return
        widths = [max([_cell_width(c.label), *(_cell_width(v) for v in self.get_column(c.key))])
                  for c in columns]
        excess = sum(widths) - room
        for index in self.shrink_order:
            if excess <= 0:
                break
            floor = min(widths[index], max(_cell_width(columns[index].label), 6))
            cut = min(excess, widths[index] - floor)
            widths[index] -= cut
            excess -= cut
        for column, width in zip(columns, widths, strict=True):
            column.width, column.auto_width = width, False
        # DataTable recomputes its virtual size only when told: widths changed under it.
        self._require_update_dimensions = True
        self.refresh()


def pane_bindings(pane: type[Pane]) -> list[Binding]:
    out = []
    for b in pane.BINDINGS:
        if isinstance(b, Binding):
            out.append(b)
        else:
            out.append(Binding(*b))
    return out


class VolumePane(Pane):
    """A screen working on the chosen bundle that can take one more volume (key ``a``)."""

    def action_add_volume(self) -> None:
        self.ask("Add a volume", [Field("path", "Path of the next volume",
                                        "/media/usb2/bundle/vol-002")], self._added)

    def _added(self, values: dict[str, str]) -> None:
        path = existing_dir(values["path"])
        if path not in self.ctx.selected:
            self.ctx.selected = (*self.ctx.selected, path)
        self.reload()


@dataclass(frozen=True)
class _Form:
    title: str
    fields: tuple[Field, ...]
    then: Callable[[dict[str, str]], None]
    explanation: str
