"""Serve screen: start and stop the inference server, its status and metrics, and a small
chat panel to try a model. The server is the same one ``appliance serve`` runs (see
``appliance.tui.serving``); only published, verified models load.

``s`` asks for the models, the listen address, threads, context and an API key file (the
``appliance serve`` options, with its defaults). The server runs inside the TUI: it stops
when the TUI quits, which the screen says; a lasting server is ``appliance serve`` (or the
systemd unit in packaging/). The focus stays where the operator put it: starting the server
does not move it into the chat box, so the screen's keys keep working (``m`` goes there).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Input, RichLog, Select, Static

from appliance.errors import UsageError
from appliance.serve.store_resolver import servable_names
from appliance.tui.base import Field, Pane, StoreChanged, TuiContext
from appliance.tui.serving import (
    METRICS,
    ServeController,
    ServeOptions,
    ServeStatus,
    default_threads,
)

POLL_SECONDS = 2.0
STOPS_WITH_TUI = ("The server runs inside this TUI and stops when you quit it (q); for one "
                  "that keeps running use 'appliance serve' or the systemd unit (packaging/).")
STOPPED = "server stopped. Press s to choose models and settings and start it."


def _number(values: dict[str, str], name: str, label: str) -> int:
    text = values.get(name, "").strip() or "0"
    if not text.isdigit():
        raise UsageError(f"{label} must be a whole number (0: the default), not {text!r}")
    return int(text)


def options_from(values: dict[str, str]) -> ServeOptions:
    """The start dialog's values as server options (UsageError on a value that is not)."""
    key_file = values.get("keys", "").strip()
    return ServeOptions(
        models=tuple(values.get("models", "").split()),
        listen=values.get("listen", "").strip() or "127.0.0.1:0",
        n_threads=_number(values, "threads", "Threads"),
        n_ctx=_number(values, "ctx", "Context"),
        api_key_file=Path(key_file).expanduser() if key_file else None,
    )


class ServePane(Pane):
    PANE_ID = "serve"
    TITLE = "Serve"
    HELP = ("Starts the OpenAI-compatible server on this host's verified models (llama.cpp, "
            "one crash-isolated worker per model): s asks which models, the address, "
            "threads, context and an API key file. It stops when the TUI quits. m goes to "
            "the chat box at the bottom (Enter asks the model, Esc comes back).")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "start", "Start"),
        Binding("x", "stop", "Stop"),
        Binding("r", "reload", "Refresh"),
        Binding("m", "focus_chat", "Chat"),
        Binding("escape", "leave_chat", "Leave chat", show=False),
    ]
    DEFAULT_CSS = """
    ServePane #serve-chat-log { height: 1fr; border: round $primary-darken-2; }
    ServePane #serve-row { height: auto; }
    """

    def __init__(self, ctx: TuiContext) -> None:
        super().__init__(ctx)
        self.controller = ServeController(
            ctx.store_dir, ServeOptions(listen=ctx.serve_listen, n_ctx=ctx.serve_ctx))
        self.last: ServeStatus | None = None
        self.answers: list[str] = []
        self._names: list[str] = []  # the models offered in the chat's model picker

    def compose(self) -> ComposeResult:
        yield Static(STOPPED, id="serve-status", classes="status")
        yield Select[str]([], id="serve-model", prompt="model", allow_blank=True)
        yield RichLog(id="serve-chat-log", wrap=True, markup=False)
        yield Input(placeholder="m: ask the model, then Enter (Esc: back to the keys)",
                    id="serve-input")

    def on_mount(self) -> None:
        self.set_interval(POLL_SECONDS, self._poll)

    def on_unmount(self) -> None:
        self.controller.stop()

    def focus_first(self) -> None:
        self.query_one("#serve-chat-log", RichLog).focus()

    def action_focus_chat(self) -> None:
        self.query_one("#serve-input", Input).focus()

    def action_leave_chat(self) -> None:
        self.focus_first()

    def _poll(self) -> None:
        if self.controller.running and not self.busy:
            self.reload()

    def reload(self) -> None:
        controller = self.controller
        self.load(controller.status, self.show)

    def action_reload(self) -> None:
        self.reload()

    def show(self, status: ServeStatus) -> None:
        self.last = status
        widget = self.query_one("#serve-status", Static)
        if status.url is None:
            widget.update(STOPPED)
            return
        colour = {"ok": "green", "loading": "yellow", "starting": "yellow"}.get(status.state,
                                                                                "red")
        models = "; ".join(
            f"{name}: {info.get('state')}" + (f" ({info['detail']})" if info.get("detail")
                                              else "")
            for name, info in status.models.items())
        metrics = ", ".join(f"{label} {status.metrics[key]:.3g}"
                            for key, label in METRICS.items() if key in status.metrics)
        keys = "API key required" if self.controller.options.api_key_file else "no API key"
        widget.update(f"[{colour}]{status.state}[/] at {status.url}/v1 ({keys})  "
                      f"{escape(models)}\n{metrics}\n[dim]stops when the TUI quits[/]")
        select = self.query_one("#serve-model", Select)
        names = list(status.models)
        if names and names != self._names:
            self._names = names
            select.set_options((n, n) for n in names)
            select.value = names[0]

    # -- start: the options dialog, then the server --------------------------------------

    def action_start(self) -> None:
        if self.controller.running:
            self.notify("the server is already running")
            return
        store = self.ctx.store_dir
        self.load(lambda: servable_names(store, ()), self._ask_options, group="offer")

    def _ask_options(self, names: tuple[str, ...]) -> None:
        o = self.controller.options
        fields = [
            Field("models", "Models (space separated; empty: every verified model)",
                  value=" ".join(o.models or names), required=False),
            Field("listen", "Listen on HOST:PORT (port 0: any free port)", value=o.listen),
            Field("threads", "llama.cpp threads per model (0: the default)",
                  value=str(o.n_threads or default_threads())),
            Field("ctx", "Context in tokens (0: the model's own)", value=str(o.n_ctx)),
            Field("keys", "API key file (empty: no key; needed off loopback)",
                  "/etc/appliance/api-keys",
                  value=str(o.api_key_file) if o.api_key_file else "", required=False),
        ]
        self.ask("Start the server", fields, self._start, STOPS_WITH_TUI)

    def _start(self, values: dict[str, str]) -> None:
        options = options_from(values)
        self.query_one("#serve-status", Static).update("starting: loading the models...")
        controller = self.controller
        self.start_job("start server",
                       lambda job: controller.start(options, cancelled=job.cancelled),
                       self._started, failed=self._start_failed)

    def _start_failed(self, error: BaseException) -> None:
        self.query_one("#serve-status", Static).update(STOPPED)
        self.ask_again(error)

    def _started(self, status: ServeStatus) -> None:
        self.show(status)
        self.post_message(StoreChanged())  # serve-start is audited
        self.notify(f"server {status.state} at {status.url}; it stops when the TUI quits. "
                    "m: chat")

    def action_stop(self) -> None:
        """Stop the server, also while it is still loading (that wait is cancelled)."""
        if not self.controller.running:
            self.notify("the server is not running")
            return
        if self.busy and self.job is not None:
            self.job.cancel()  # a start still waiting for the models to load gives up
        controller = self.controller
        self.load(controller.stop, self._stopped, group="stop")

    def _stopped(self, _: object) -> None:
        self.show(ServeStatus(None, "stopped", {}, {}))
        self.notify("server stopped")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        select = self.query_one("#serve-model", Select)
        model = select.value if isinstance(select.value, str) else None
        if not self.controller.running or model is None:
            self.notify("start the server first (Esc, then s)", severity="warning")
            return
        event.input.value = ""
        log = self.query_one("#serve-chat-log", RichLog)
        log.write(f"you> {text}")
        controller = self.controller
        self.start_job("chat", lambda job: controller.chat(model, text), self._answered)

    def _answered(self, answer: str) -> None:
        self.answers.append(answer)
        self.query_one("#serve-chat-log", RichLog).write(f"model> {answer}")
        self.reload()
