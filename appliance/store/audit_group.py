"""Audit records from many threads, committed together (group commit).

``appliance serve --audit-requests`` appends one record per answer, from the thread pool that
answers run their blocking work on. Each ``audit.append`` is its own IMMEDIATE transaction:
a connection, a commit with its fsync, and the head file's write and fsync, and concurrent
appends queue on SQLite's write lock one after the other. ``GroupedAudit.append`` keeps the
guarantee a caller relies on, that its record is durable when the call returns, but lets the
callers that arrive while one commit runs share the next one:

- the first caller with nobody committing becomes the writer: it takes every record waiting
  (its own among them), appends them in order in one transaction (``audit.append_many``),
  and wakes the others;
- a caller whose record went into that transaction returns its record; one still waiting
  becomes the next writer.

A failed transaction fails every caller whose record it held, with the same error; nothing
of it is committed, and later callers start a fresh one. No thread is kept running, so there
is nothing to stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance.store import audit

AppendMany = Callable[[Path, Sequence[tuple[str, dict[str, Any]]]], list[audit.AuditRecord]]


class _Pending:
    __slots__ = ("details", "kind", "outcome")

    def __init__(self, kind: str, details: dict[str, Any]) -> None:
        self.kind, self.details = kind, details
        self.outcome: audit.AuditRecord | BaseException | None = None  # None: not yet


class GroupedAudit:
    """``append(kind, details)`` from any thread; see the module docstring."""

    def __init__(self, store_dir: Path, *, append_many: AppendMany = audit.append_many) -> None:
        self.store_dir = store_dir
        self._append_many = append_many
        self._changed = threading.Condition()
        self._waiting: list[_Pending] = []
        self._writing = False
        self.commits = 0  # transactions so far (tests)

    @property
    def waiting(self) -> int:
        """Records queued for the next transaction (tests)."""
        with self._changed:
            return len(self._waiting)

    def append(self, kind: str, details: dict[str, Any]) -> audit.AuditRecord:
        mine = _Pending(kind, details)
        with self._changed:
            self._waiting.append(mine)
            while mine.outcome is None and self._writing:
                self._changed.wait()
            if mine.outcome is not None:
                return self._outcome(mine)
            batch, self._waiting, self._writing = self._waiting, [], True
        try:
            records = self._append_many(self.store_dir,
                                        [(p.kind, p.details) for p in batch])
            failure: BaseException | None = None
        except BaseException as e:  # every caller in the batch hears of it
            records, failure = [], e
        with self._changed:
            for i, pending in enumerate(batch):
                pending.outcome = records[i] if failure is None else failure
            self.commits += 1
            self._writing = False
            self._changed.notify_all()
        return self._outcome(mine)

    @staticmethod
    def _outcome(pending: _Pending) -> audit.AuditRecord:
        if isinstance(pending.outcome, BaseException):
            raise pending.outcome
        assert pending.outcome is not None  # a caller returns only once its batch settled
        return pending.outcome
