"""Where a store is on disk, and whether there is one: checked before anything is created.

``check_store_path`` turns a store path that is (or lies under) a plain file into a
``StoreError`` that says so, instead of the ``[Errno 17] File exists`` that creating the
directory would raise. ``require_existing_store`` is for commands that only read: they must
not create an empty store where the operator mistyped a path; ``StoreNotFoundError`` (exit 1)
says what creates one.
"""

from __future__ import annotations

from pathlib import Path

from appliance.errors import StoreError, StoreNotFoundError


def check_store_path(store_dir: Path) -> None:
    """StoreError when ``store_dir`` or the nearest existing folder above it is not a folder."""
    for candidate in (store_dir, *store_dir.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                where = "" if candidate == store_dir else f" ({candidate} is a file)"
                raise StoreError(
                    f"the store path {store_dir} is not a directory{where}: give a store "
                    "directory (--store DIR or $APPLIANCE_HOME)"
                )
            return


def store_exists(store_dir: Path) -> bool:
    from appliance.store.db import INDEX_NAME  # db calls check_store_path: import it late

    check_store_path(store_dir)
    return (store_dir / INDEX_NAME).is_file()


def require_existing_store(store_dir: Path) -> None:
    """StoreNotFoundError unless ``store_dir`` holds a store index (nothing is created)."""
    if not store_exists(store_dir):
        raise StoreNotFoundError(
            f"there is no store at {store_dir} yet: 'appliance trust install' and then "
            "'appliance import' or 'appliance peer pull' create it (or give the right one "
            "with --store DIR or $APPLIANCE_HOME)"
        )
