"""What every TUI screen shares: the app context, the pane base class with its job runner,
the cross-screen messages, and the small modal dialogs (confirm, prompt, explanation).

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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Static
from textual.worker import Worker, get_current_worker

from appliance.tui.explain import Explanation, explain
from appliance.tui.service import DEFAULT_SCAN_ROOTS, Cancelled, cancellable

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
    serve_ctx: int = 2048


# --- messages between screens ------------------------------------------------------------


class BundleChosen(Message):
    """The operator picked a bundle (volume paths) on the Media screen."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self.paths = tuple(paths)


class ImportWanted(Message):
    """Go to the Import screen with the current bundle."""


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

    # -- plumbing ------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.ctx.clock()

    def call_ui(self, callback: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the app is shutting down, nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self.app.call_from_thread(callback, *args)

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


def add_plain_row(table: DataTable[Any], *cells: object, key: str | None = None) -> None:
    """A row whose text is shown as is: DataTable would read ``[...]`` in a str as markup,
    and paths, audit details and peer answers are not ours to style (or to break)."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells), key=key)


def pane_bindings(pane: type[Pane]) -> list[Binding]:
    out = []
    for b in pane.BINDINGS:
        if isinstance(b, Binding):
            out.append(b)
        else:
            out.append(Binding(*b))
    return out


# --- modal dialogs -----------------------------------------------------------------------


class VolumePane(Pane):
    """A screen working on the chosen bundle that can take one more volume (key ``v``)."""

    def action_add_volume(self) -> None:
        self.app.push_screen(
            PromptScreen("Add a volume", [Field("path", "Path of the next volume",
                                                "/media/usb2/bundle/vol-002")]),
            self._added,
        )

    def _added(self, values: dict[str, str] | None) -> None:
        if not values:
            return
        path = Path(values["path"]).expanduser()
        if path not in self.ctx.selected:
            self.ctx.selected = (*self.ctx.selected, path)
        self.reload()


class ExplainScreen(ModalScreen[None]):
    """A refusal or failure in plain words, with what to do next."""

    AUTO_FOCUS = "*"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,q", "close", "Close"),
    ]
    DEFAULT_CSS = """
    ExplainScreen { align: center middle; }
    ExplainScreen > VerticalScroll {
        width: 72; max-width: 95%; height: auto; max-height: 90%;
        border: thick $error; background: $surface; padding: 0 1;
    }
    ExplainScreen.plain > VerticalScroll { border: thick $warning; }
    ExplainScreen #explain-title { text-style: bold; color: $error; }
    ExplainScreen.plain #explain-title { color: $warning; }
    ExplainScreen #explain-detail { color: $text-muted; }
    """

    def __init__(self, explanation: Explanation) -> None:
        super().__init__(classes="" if explanation.refused else "plain")
        self.explanation = explanation

    def compose(self) -> ComposeResult:
        e = self.explanation
        with VerticalScroll():
            yield Label(e.title, id="explain-title")
            yield Static(e.what, id="explain-what")
            yield Static(f"What to do: {e.next_step}", id="explain-next")
            yield Static(e.detail, id="explain-detail", markup=False)
            yield Button("Close", id="explain-close")

    def on_button_pressed(self) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    AUTO_FOCUS = "*"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 64; max-width: 95%; height: auto; border: thick $warning;
        background: $surface; padding: 0 1;
    }
    ConfirmScreen Horizontal { height: auto; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question, markup=False)
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    placeholder: str = ""
    value: str = ""
    required: bool = True


class PromptScreen(ModalScreen[dict[str, str] | None]):
    """A small form: one Input per field; Enter on the last one submits, Escape cancels."""

    AUTO_FOCUS = "*"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > Vertical {
        width: 72; max-width: 95%; height: auto; border: thick $primary;
        background: $surface; padding: 0 1;
    }
    PromptScreen #prompt-problem { color: $error; height: auto; }
    """

    def __init__(self, title: str, fields: Sequence[Field], explanation: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.fields = tuple(fields)
        self.explanation = explanation

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            if self.explanation:
                yield Static(self.explanation, markup=False)
            for f in self.fields:
                yield Label(f.label)
                yield Input(value=f.value, placeholder=f.placeholder, id=f"field-{f.name}")
            yield Static("", id="prompt-problem")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        index = inputs.index(event.input)
        if index + 1 < len(inputs):
            inputs[index + 1].focus()
            return
        values = {f.name: self.query_one(f"#field-{f.name}", Input).value.strip()
                  for f in self.fields}
        missing = [f.label for f in self.fields if f.required and not values[f.name]]
        if missing:
            self.query_one("#prompt-problem", Static).update(f"needed: {', '.join(missing)}")
            return
        self.dismiss(values)

    def action_cancel(self) -> None:
        self.dismiss(None)
