"""The documentation stays true: files it names exist, links resolve, thresholds follow the code.

Issue 13 item 6 and issue 21 item 18: a newcomer reads the README in an hour and trusts what the
docstrings point at.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from appliance.limits import MIN_COMPRESSION_SAVING
from appliance.peer.protocol import DEFAULT_PORT

REPO = Path(__file__).resolve().parent.parent
# A repository path as docstrings write it: docs/FORMAT.md, appliance/store/db.py, ...
REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:docs|scripts|bundles|keys|packaging|bench|tests|appliance)/"
    r"[\w./-]*\w\.(?:md|py|sh|yaml|spec|service|toml))(?![\w/])"
)
# A document named alone (DESIGN.md): it lives in docs/ or at the top.
BARE_DOC = re.compile(r"(?<![\w./-])([A-Z][A-Z_]*\.md)\b")
# Names that are not repository files: the guide as the ISO image carries it, run outputs.
NOT_REPO_FILES = {"OPERATOR.md"}
OUTPUT_DIRS = ("bench/results/",)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "keys" / "README.md",
        REPO / "bundles" / "README.md", REPO / "bench" / "README.md"]
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _docstrings_and_comments(source: str) -> list[tuple[int, str]]:
    found = [(t.start[0], t.string)
             for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


def _shell_comments(source: str) -> list[tuple[int, str]]:
    return [(number, line) for number, line in enumerate(source.splitlines(), start=1)
            if line.lstrip().startswith("#")]


def _named_files() -> list[tuple[str, str]]:
    """(where, path) for every repository path named in appliance/ and bench/ docstrings and
    comments, and in the comments of the shell scripts."""
    sources = [(m, _docstrings_and_comments) for m in sorted((REPO / "appliance").rglob("*.py"))]
    sources += [(m, _docstrings_and_comments) for m in sorted((REPO / "bench").glob("*.py"))]
    sources += [(s, _shell_comments) for s in [*sorted((REPO / "scripts").glob("*.sh")),
                                               REPO / "build_iso.sh"]]
    named = []
    for source, texts in sources:
        where = str(source.relative_to(REPO))
        for line, text in texts(source.read_text()):
            named += [(f"{where}:{line}", path) for path in REPO_PATH.findall(text)
                      if not path.startswith(OUTPUT_DIRS)]
            named += [(f"{where}:{line}", name) for name in BARE_DOC.findall(text)
                      if name not in NOT_REPO_FILES]
    return named


def test_every_file_a_docstring_or_comment_names_exists() -> None:
    named = _named_files()
    assert len(named) > 10, "the scan found almost nothing: the pattern is broken"
    missing = [f"{where} names {path}" for where, path in named
               if not ((REPO / path).exists() or (REPO / "docs" / path).exists())]
    assert missing == []


def test_the_scan_sees_a_missing_file() -> None:
    source = '"""See docs/NOPE.md and appliance/nope/gone.py."""\n# and scripts/gone.sh\n'
    texts = [text for _, text in _docstrings_and_comments(source)]
    assert sorted(p for t in texts for p in REPO_PATH.findall(t)) == [
        "appliance/nope/gone.py", "docs/NOPE.md", "scripts/gone.sh"]


def test_every_relative_link_in_the_docs_resolves() -> None:
    broken = []
    for doc in DOCS:
        for target in MD_LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert broken == []


def test_readme_is_a_first_hour_read() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "cli-reference:start" not in readme, "the CLI reference lives in docs/CLI.md"
    first_block = readme.split("```", 2)[1]
    assert "bash scripts/demo.sh" in first_block and "bash scripts/test.sh" in first_block


def test_raw_storage_threshold_is_stated_once_and_follows_the_code() -> None:
    """docs/FORMAT.md states MIN_COMPRESSION_SAVING; other docs link there, with no number."""
    fmt = (REPO / "docs" / "FORMAT.md").read_text()
    assert f"(1 - {MIN_COMPRESSION_SAVING:.2f}) x" in fmt
    for doc in DOCS:
        if doc.name == "FORMAT.md":
            continue
        for line in doc.read_text().splitlines():
            if "MIN_COMPRESSION_SAVING" in line or "stored raw" in line:
                assert not re.search(r"\d\s?%", line), f"{doc.relative_to(REPO)}: {line}"


def test_peer_urls_in_help_texts_use_the_default_port() -> None:
    """Issue 21 item 18: examples said 8443 while peers listen on 8765."""
    ports = []
    for module in sorted((REPO / "appliance").rglob("*.py")):
        ports += [(module.name, int(p))
                  for p in re.findall(r"https://[\w.-]+:(\d+)", module.read_text())]
    assert ports, "no peer URL found in any help text: the pattern is broken"
    assert [(name, port) for name, port in ports if port != DEFAULT_PORT] == []


def test_tui_help_names_each_step_by_its_screen_key() -> None:
    """Issue 21 item 18: the help's flow said "5. Serve" while Serve is screen 6."""
    from appliance.tui.app import FLOW, PANES

    steps = re.findall(r"^- `(\d)` \*\*(\w+)\*\*", FLOW, flags=re.MULTILINE)
    assert [title for _, title in steps] == ["Media", "Inspect", "Import", "Models", "Serve"]
    assert [(key, PANES[int(key) - 1].TITLE) for key, _ in steps] == steps



def test_help_examples_name_the_default_model_as_the_store_does() -> None:
    """Issue 21 item 18: a --help example pulled "gemma-3-270m"; the store calls it gemma3-270m
    (the file is gemma-3-270m-q4_k_m.gguf)."""
    from appliance.cli import reference
    from appliance.default_model import MODEL_FILE

    text = reference.reference()
    assert "gemma3-270m" in text
    assert re.findall(r"gemma-3-270m\S*", text.replace(MODEL_FILE, "")) == []
