"""Removing a model from the store: the one function ``appliance models rm`` and the TUI's
Models screen call (writer lock, index first then files, an audit record naming who asked).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from appliance.store import trust_state
from appliance.store.layout import writer_lock
from appliance.store.records import ModelRecord
from appliance.store.store import Store


def remove_model(store_dir: Path, ref: str, now: datetime | None = None, *,
                 user: str | None = None) -> ModelRecord:
    """Remove model ``ref`` (NAME or NAME:VERSION) under the store's writer lock; the audit
    record's ``user`` is ``user`` or, by default, the operating-system user, as every other
    record's (``trust_state.who``). Raises ModelNotFoundError when there is no such model."""
    with writer_lock(store_dir, "models rm"), Store(store_dir) as store:
        return store.remove_model(ref, now, user=user or trust_state.who())
