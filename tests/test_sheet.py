"""The approver's one-page sheet: models, sizes, licences, signers, manifest words."""

from __future__ import annotations

from pathlib import Path

from bundle_helpers import root_file
from trust_helpers import kid, private

from appliance.bundle.reader import open_media
from appliance.bundle.sheet import MANIFEST_WORDS, approval_sheet, sheet_html
from appliance.cli.main import main
from appliance.errors import EXIT_OK
from appliance.format.signing import fingerprint_words, public_bytes


def test_sheet_names_models_signers_and_manifest_words(two_signer_media: Path) -> None:
    opened = open_media([two_signer_media])
    manifest = opened.parse_unverified()
    text = approval_sheet(opened, manifest, verified=False)
    assert text.startswith("# Approval sheet: bundle site-models #1\n")
    assert "**UNVERIFIED**" in text.splitlines()[2]
    model = manifest.models[0]
    size = f"{model.size / 1e3:.1f} KB ({model.size:,} bytes)"
    assert f"| acme/tiny | q4_k_m | apache-2.0 | {size} | llama |" in text
    for name in ("p1", "p2"):
        words = fingerprint_words(public_bytes(private(name)))
        assert f"| {name} | `{kid(name)}` | {words} |" in text
    words = fingerprint_words(opened.manifest_bytes, MANIFEST_WORDS)
    assert len(words.split("-")) == 12
    assert f"**{words}**" in text and opened.manifest_hash in text
    # A different manifest reads differently aloud.
    assert fingerprint_words(opened.manifest_bytes + b"\n", MANIFEST_WORDS) != words
    assert len(text.splitlines()) < 60  # one page


def test_sheet_cli_markdown_and_html(two_signer_media: Path, tmp_path: Path) -> None:
    root = root_file(tmp_path)
    out = tmp_path / "sheet.md"
    assert main(["bundle", "sheet", str(two_signer_media), "--trust", str(root),
                 "-o", str(out)]) == EXIT_OK
    text = out.read_text()
    assert "Signatures **verified**" in text and "UNVERIFIED" not in text
    page = tmp_path / "sheet.html"
    assert main(["bundle", "sheet", str(two_signer_media), "--html", "-o", str(page)]) == EXIT_OK
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    assert f"<code>{kid('p1')}</code>" in html


def test_table_cells_cannot_be_split_by_a_pipe(two_signer_media: Path) -> None:
    opened = open_media([two_signer_media])
    manifest = opened.parse_unverified()
    odd = manifest.models[0].__class__(**{**manifest.models[0].__dict__,
                                          "license": "MIT | evil"})
    text = approval_sheet(opened, manifest.__class__(**{**manifest.__dict__,
                                                        "models": (odd,)}), verified=False)
    assert "| MIT \\| evil |" in text
    assert sheet_html(text, "t").count("<td>MIT | evil</td>") == 1
