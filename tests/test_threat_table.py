"""The hostile-input table in docs/DESIGN.md ("Threat model") cannot go stale.

Each row of the table names the input, what happens (error classes in backticks, with
``(exit N)`` where the CLI's exit code is stated) and the tests that assert it, written
``tests/test_x.py::test_name`` or ``tests/test_x.py::test_name[case id]``. This module checks,
statically (``ast``, no pytest collection, so it runs in well under a second and does not
depend on every other test module importing cleanly at this moment):

- every named test file exists and defines that test function (module level or in a class);
- every part of a case id appears in that file, so a renamed parametrize case is caught;
- every error class named is an ``ApplianceError`` in ``appliance.errors``, with the exit
  code the row states;
- every numbered case of issue 14 (items 1-9, marked ``(14.N)`` in the input column) has a row.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from appliance import errors

REPO = Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs" / "DESIGN.md"
SECTION = "## Threat model"
HEADER = ("input", "what happens (error class, exit code)", "test")

_TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")
_ERROR = re.compile(r"`([A-Z]\w*Error)`(?:\s*\(exit (\d)\))?")
_ISSUE_ITEM = re.compile(r"\(14\.(\d)\)")
# What may stand between the test references of one cell.
_SEPARATORS = re.compile(r"(?:\s|,|;|<br>)+")
ISSUE_14_ITEMS = set(range(1, 10))
MIN_ROWS = 100  # the table as written has more; a lost half is a failure, not a shrug


@dataclass(frozen=True)
class Row:
    line: int
    input: str
    happens: str
    tests: str


@dataclass(frozen=True)
class NamedTest:
    file: str
    name: str
    case: str | None

    def __str__(self) -> str:
        return f"{self.file}::{self.name}" + (f"[{self.case}]" if self.case else "")


def threat_model(text: str) -> tuple[int, str]:
    """The "Threat model" section of DESIGN.md and the line number it starts at."""
    start = text.find(f"\n{SECTION}\n")
    assert start >= 0, f"docs/DESIGN.md has no '{SECTION}' section"
    end = text.find("\n## ", start + 1)
    return text.count("\n", 0, start) + 2, text[start + 1:end if end >= 0 else len(text)]


def table_rows(text: str) -> list[Row]:
    """Every row of the section's input | what happens | test tables (header rows and
    separators skipped). A table row with another shape is an error, not ignored."""
    first, section = threat_model(text)
    rows: list[Row] = []
    in_table = False
    for offset, raw in enumerate(section.splitlines()):
        line = raw.strip()
        if not line.startswith("|"):
            in_table = False
            continue
        cells = tuple(cell.strip() for cell in line.strip("|").split("|"))
        if cells == HEADER:
            in_table = True
            continue
        if not in_table or set(line) <= set("|-: "):
            continue
        assert len(cells) == 3, f"docs/DESIGN.md:{first + offset}: expected 3 cells: {line}"
        rows.append(Row(first + offset, *cells))
    return rows


def refs_in(cell: str) -> list[NamedTest]:
    return [NamedTest(*match.groups()) for match in _TEST_REF.finditer(cell)]


@cache
def defined_tests(file: str) -> frozenset[str]:
    """Test function names defined in ``file`` at module level or in a class."""
    tree = ast.parse((REPO / file).read_text())
    names: set[str] = set()
    for node in tree.body:
        bodies = node.body if isinstance(node, ast.ClassDef) else [node]
        names.update(f.name for f in bodies
                     if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef))
    return frozenset(names)


def missing(ref: NamedTest) -> str | None:
    """Why ``ref`` names no test, or None when it does."""
    path = REPO / ref.file
    if not path.is_file():
        return f"{ref}: no such file"
    if ref.name not in defined_tests(ref.file):
        return f"{ref}: {ref.file} defines no {ref.name}"
    if ref.case is not None:
        source = path.read_text()
        absent = [part for part in ref.case.split("-") if part and part not in source]
        if absent:
            return f"{ref}: case id part(s) {absent} appear nowhere in {ref.file}"
    return None


def wrong_error(name: str, exit_code: str | None) -> str | None:
    """Why the error class ``name`` (with the exit code a row states) is wrong, or None."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ApplianceError)):
        return f"{name} is not an ApplianceError in appliance.errors"
    if exit_code is not None and cls.exit_code != int(exit_code):
        return f"{name} exits {cls.exit_code}, the table says {exit_code}"
    return None


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return table_rows(DESIGN.read_text())


def test_the_table_is_there_and_every_row_names_its_tests(rows: list[Row]) -> None:
    assert len(rows) >= MIN_ROWS, f"only {len(rows)} rows in the threat-model table"
    bad = []
    for row in rows:
        leftover = _SEPARATORS.sub("", _TEST_REF.sub("", row.tests))
        if not row.input or not row.happens or not refs_in(row.tests) or leftover:
            bad.append(f"docs/DESIGN.md:{row.line}: {row.tests!r}")
    assert bad == [], "rows without a test, or with text that is not a test reference"


def test_every_named_test_exists(rows: list[Row]) -> None:
    problems = {problem for row in rows for ref in refs_in(row.tests)
                if (problem := missing(ref)) is not None}
    assert sorted(problems) == []


def test_every_error_class_named_exists_with_its_exit_code(rows: list[Row]) -> None:
    named = {(m.group(1), m.group(2)) for row in rows for m in _ERROR.finditer(row.happens)}
    assert len(named) > 20
    problems = {problem for name, code in named
                if (problem := wrong_error(name, code)) is not None}
    assert sorted(problems) == []


def test_every_case_of_issue_14_has_a_row(rows: list[Row]) -> None:
    covered = {int(n) for row in rows for n in _ISSUE_ITEM.findall(row.input)}
    assert covered == ISSUE_14_ITEMS, f"no row for item(s) {sorted(ISSUE_14_ITEMS - covered)}"


def test_the_checks_catch_what_they_are_for() -> None:
    """Each check fails on the mistake it exists for, so the table tests cannot pass vacuously."""
    real = "tests/test_audit.py"
    assert missing(NamedTest(real, "test_intact_chain_verifies", None)) is None
    assert "defines no" in str(missing(NamedTest(real, "test_no_such_thing", None)))
    assert "no such file" in str(missing(NamedTest("tests/test_gone.py", "test_x", None)))
    assert "case id" in str(missing(
        NamedTest("tests/test_yamlsafe.py", "test_yaml_1_1_oddities_are_refused", "no-such-id")))
    assert wrong_error("ThresholdError", "2") is None
    assert "exits 2" in str(wrong_error("ThresholdError", "3"))
    assert "not an ApplianceError" in str(wrong_error("ValueError", None))
    assert "not an ApplianceError" in str(wrong_error("NoSuchError", None))
    doc = (f"intro\n{SECTION}\n\n| {' | '.join(HEADER)} |\n|---|---|---|\n"
           "| a (14.1) | `StoreError` (exit 3) | `tests/test_store.py::test_x` |\n"
           "| b | c | not a reference |\n\n| other | table |\n|---|---|\n| x | y |\n"
           "\n## Next\n| d | e | `tests/test_y.py::test_z` |\n")
    parsed = table_rows(doc)
    assert [(r.input, r.happens) for r in parsed] == [("a (14.1)", "`StoreError` (exit 3)"),
                                                     ("b", "c")]
    assert [str(ref) for ref in refs_in(parsed[0].tests)] == ["tests/test_store.py::test_x"]
    assert refs_in(parsed[1].tests) == []
