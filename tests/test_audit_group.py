"""Group commit of audit records (``appliance.store.audit_group``): records from many threads
land in order on one valid chain, the callers that arrive while one commit runs share the
next one, and a failed commit fails exactly the callers whose records it held."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import StoreError
from appliance.store import audit
from appliance.store.audit_group import GroupedAudit
from appliance.store.db import connect


def _store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    connect(store).close()
    return store


def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_records_from_many_threads_form_one_valid_chain(tmp_path: Path) -> None:
    store = _store(tmp_path)
    grouped = GroupedAudit(store)
    got: dict[tuple[int, int], audit.AuditRecord] = {}

    def answer(thread: int) -> None:
        for i in range(20):
            got[thread, i] = grouped.append("request", {"thread": thread, "i": i})

    threads = [threading.Thread(target=answer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.verify(store) == 160
    logged = {r.seq: r for r in audit.records(store)}
    for (thread, i), record in got.items():  # each caller got its own record, as committed
        assert logged[record.seq] == record
        assert record.details == {"thread": thread, "i": i}
    assert audit.read_head(store) == (160, logged[160].hash)
    assert grouped.commits <= 160


class _Gate:
    """An ``append_many`` whose first call waits for ``release``: the callers that come
    meanwhile queue behind it, as they do behind a slow fsync."""

    def __init__(self, fail_batch: int | None = None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []
        self.fail_batch = fail_batch

    def __call__(self, store_dir: Path, entries: Sequence[tuple[str, dict[str, Any]]]
                 ) -> list[audit.AuditRecord]:
        self.batches.append([details["who"] for _, details in entries])
        if len(self.batches) == 1:
            self.entered.set()
            self.release.wait(10)
        if self.fail_batch == len(self.batches):
            raise StoreError("disk full")
        return audit.append_many(store_dir, entries)


def _queued_behind_a_held_commit(store: Path, gate: _Gate, later: str
                                 ) -> tuple[GroupedAudit, dict[str, Any]]:
    """Caller "a" commits through ``gate`` and is held there while each of ``later`` queues;
    then the gate opens. Every caller's record, or error, by name."""
    grouped = GroupedAudit(store, append_many=gate)
    out: dict[str, Any] = {}
    first = _start(grouped, "a", out)
    assert gate.entered.wait(10)
    rest = [_start(grouped, who, out) for who in later]
    _until(lambda: grouped.waiting == len(later))
    assert not out  # nobody returns before its record is committed
    gate.release.set()
    for t in (first, *rest):
        t.join(10)
    return grouped, out


def _start(grouped: GroupedAudit, who: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            out[who] = grouped.append("request", {"who": who})
        except StoreError as e:
            out[who] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_callers_waiting_on_a_commit_share_the_next_one(tmp_path: Path) -> None:
    store = _store(tmp_path)
    gate = _Gate()
    grouped, out = _queued_behind_a_held_commit(store, gate, "bcd")
    assert gate.batches[0] == ["a"]
    assert sorted(gate.batches[1]) == ["b", "c", "d"] and len(gate.batches) == 2
    assert grouped.commits == 2
    assert audit.verify(store) == 4
    assert sorted(r.details["who"] for r in out.values()) == ["a", "b", "c", "d"]


def test_a_failed_commit_fails_its_callers_only_and_the_next_one_starts_afresh(
        tmp_path: Path) -> None:
    store = _store(tmp_path)
    grouped, out = _queued_behind_a_held_commit(store, _Gate(fail_batch=2), "bc")
    assert isinstance(out["a"], audit.AuditRecord)
    assert isinstance(out["b"], StoreError) and isinstance(out["c"], StoreError)
    later = grouped.append("request", {"who": "e"})
    assert [r.details["who"] for r in audit.records(store)] == ["a", "e"]
    assert later.seq == 2 and audit.verify(store) == 2


def test_append_many_writes_nothing_when_one_record_cannot_be_written(tmp_path: Path) -> None:
    store = _store(tmp_path)
    audit.append(store, "import", {"n": 1})
    with pytest.raises(TypeError):
        audit.append_many(store, [("request", {"ok": True}), ("request", {"bad": object()})])
    assert [r.details for r in audit.records(store)] == [{"n": 1}]
    assert audit.verify(store) == 1
