"""The TUI's small modal dialogs: a refusal or failure explained, a yes/no question, and a
form of a few inputs (``Field``). Screens open them through ``Pane`` (``appliance.tui.base``),
which keeps what was typed into a form when what it asked for fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from appliance.tui.explain import Explanation


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

    def __init__(self, title: str, fields: Sequence[Field], explanation: str = "", *,
                 problem: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.fields = tuple(fields)
        self.explanation = explanation
        self.problem = problem

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            if self.explanation:
                yield Static(self.explanation, markup=False)
            for f in self.fields:
                yield Label(f.label)
                yield Input(value=f.value, placeholder=f.placeholder, id=f"field-{f.name}")
            yield Static(self.problem, id="prompt-problem", markup=False)

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
