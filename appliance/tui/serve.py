"""Serve screen: start and stop the inference server, its status and metrics, and a small
chat panel to try a model. The server is the same one ``appliance serve`` runs (see
``appliance.tui.serving``); only published, verified models load."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Input, RichLog, Select, Static

from appliance.tui.base import Pane, StoreChanged, TuiContext
from appliance.tui.serving import METRICS, ServeController, ServeStatus

POLL_SECONDS = 2.0


class ServePane(Pane):
    PANE_ID = "serve"
    TITLE = "Serve"
    HELP = ("Starts the OpenAI-compatible server on this host's verified models (llama.cpp, "
            "one crash-isolated worker per model) and shows its health and metrics. Type in "
            "the box at the bottom and press Enter to ask the model.")
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
        self.controller = ServeController(ctx.store_dir, listen=ctx.serve_listen,
                                          n_ctx=ctx.serve_ctx)
        self.last: ServeStatus | None = None
        self.answers: list[str] = []
        self._names: list[str] = []  # the models offered in the chat's model picker

    def compose(self) -> ComposeResult:
        yield Static("server stopped. Press s to start it on every verified model.",
                     id="serve-status", classes="status")
        yield Select[str]([], id="serve-model", prompt="model", allow_blank=True)
        yield RichLog(id="serve-chat-log", wrap=True, markup=False)
        yield Input(placeholder="ask the model, then Enter (Esc: back to the keys)",
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
            widget.update("server stopped. Press s to start it on every verified model.")
            return
        colour = {"ok": "green", "loading": "yellow", "starting": "yellow"}.get(status.state,
                                                                                "red")
        models = "; ".join(
            f"{name}: {info.get('state')}" + (f" ({info['detail']})" if info.get("detail")
                                              else "")
            for name, info in status.models.items())
        metrics = ", ".join(f"{label} {status.metrics[key]:.3g}"
                            for key, label in METRICS.items() if key in status.metrics)
        widget.update(f"[{colour}]{status.state}[/] at {status.url}/v1  {escape(models)}\n"
                      f"{metrics}")
        select = self.query_one("#serve-model", Select)
        names = list(status.models)
        if names and names != self._names:
            self._names = names
            select.set_options((n, n) for n in names)
            select.value = names[0]

    def action_start(self) -> None:
        if self.controller.running:
            self.notify("the server is already running")
            return
        self.query_one("#serve-status", Static).update("starting: loading the models...")
        controller = self.controller
        self.start_job("start server",
                       lambda job: controller.start(cancelled=job.cancelled), self._started)

    def _started(self, status: ServeStatus) -> None:
        self.show(status)
        self.post_message(StoreChanged())  # serve-start is audited
        self.notify(f"server {status.state} at {status.url}")
        self.query_one("#serve-input", Input).focus()

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
            self.notify("start the server first (s)", severity="warning")
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
