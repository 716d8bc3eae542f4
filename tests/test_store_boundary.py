"""The store's index is read and written only by ``appliance/store/``: no SQL elsewhere.

Serving, the doctor, the CLI and the TUI go through the store API (``records``,
``trust_state``, ``audit``, ``Store``). The check walks the syntax tree of every module, so a
docstring that names sqlite3 does not count, and any ``.execute``-family call or sqlite3
import does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import appliance

PACKAGE = Path(appliance.__file__).parent
STORE = PACKAGE / "store"
SQL_CALLS = {"execute", "executemany", "executescript"}


def sql_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every sqlite3 import, store.db import and execute-family call."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if a.name.split(".")[0] == "sqlite3" or a.name == "appliance.store.db"]
        elif isinstance(node, ast.ImportFrom) and node.module in ("sqlite3",
                                                                  "appliance.store.db"):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in SQL_CALLS):
            found.append((node.lineno, f".{node.func.attr}("))
    return found


def test_the_checker_sees_sql() -> None:
    source = "import sqlite3\nfrom appliance.store.db import connect\nconn.execute('SELECT 1')\n"
    assert [what for _, what in sql_uses(source)] == [
        "import sqlite3", "from appliance.store.db import ...", ".execute("]
    assert sql_uses('"""uses sqlite3 and .execute( in prose"""\n') == []


def test_no_sql_outside_the_store() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py")) if STORE not in path.parents
        for line, what in sql_uses(path.read_text())
    ]
    assert offenders == []
