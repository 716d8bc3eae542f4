"""Command-line options that several commands share: the override checks (the library decides
the rule, this module only maps options to it) and ``LibraryDefault``, an option default that
lives in a module too heavy to import while the parser is built."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator, Sequence
from typing import Any

from appliance.errors import UsageError


def override_options(args: argparse.Namespace) -> tuple[bool, str | None]:
    """(allow_expired, reason) of a command with --allow-expired and --reason TEXT."""
    from appliance.store.trust_state import require_override_reason

    if args.reason is not None and not args.allow_expired:
        raise UsageError("--reason goes with --allow-expired")
    require_override_reason(args.allow_expired, args.reason)
    return bool(args.allow_expired), args.reason


class LibraryDefault:
    """The default of an option, read from ``module`` (``attribute`` may be dotted, e.g.
    ``PullOptions.per_peer``) only when it is used: building the parser must not import
    httpx, libtorrent or starlette (``appliance --help`` in well under a second). ``template``
    makes the value (``"0.0.0.0:{}"``), ``shown`` the text of a command's own ``--help``
    (``"{:g}"``). The parser resolves it after parsing (``resolve_defaults``)."""

    def __init__(self, module: str, attribute: str, template: str = "{}", *,
                 shown: str = "{}") -> None:
        self.module = module
        self.attribute = attribute
        self.template = template
        self.shown = shown

    def value(self) -> Any:
        found: Any = importlib.import_module(self.module)
        for part in self.attribute.split("."):
            found = getattr(found, part)
        return found if self.template == "{}" else self.template.format(found)

    def __str__(self) -> str:
        return self.shown.format(self.value())


class LibraryChoices(Sequence[str]):
    """The ``choices`` of an option, read from ``module`` only when argparse first checks a
    value or draws the command's own ``--help`` (as ``LibraryDefault``, for a module too heavy
    to import while the parser is built)."""

    def __init__(self, module: str, attribute: str) -> None:
        self._source = LibraryDefault(module, attribute)
        self._values: tuple[str, ...] | None = None

    def _all(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._source.value())
        return self._values

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()


def resolve_defaults(namespace: argparse.Namespace) -> argparse.Namespace:
    """Replace every ``LibraryDefault`` left in parsed arguments by its value."""
    for key, value in vars(namespace).items():
        if isinstance(value, LibraryDefault):
            setattr(namespace, key, value.value())
    return namespace
