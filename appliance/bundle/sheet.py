"""The approval sheet: one printable page a site's approver signs before a bundle is admitted.

``approval_sheet(media, manifest, *, verified) -> str`` is Markdown: the bundle (channel,
sequence, dates, volumes), each model with its size, licence and GGUF facts, each signer by
name, key id and key words, the carried trust roots by fingerprint, and the manifest digest
in hex and as words for the out-of-band check (the approver reads the words to the publisher
over the phone; the words come from ``format.signing.fingerprint_words``, the same list that
names keys and trust roots). ``sheet_html`` renders the same Markdown with markdown-it (which
rich already brings) for a browser's print dialog.

The sheet says whether the signatures were checked against a trusted root; an unverified
sheet carries a warning in its first lines so it cannot pass for a verified one.
"""

from __future__ import annotations

import html

from markdown_it import MarkdownIt

from appliance.bundle.oms import OMS_SIGNATURE_NAME
from appliance.bundle.reader import Media
from appliance.bundle.sbom import signer_names
from appliance.format.manifest import Manifest, format_timestamp
from appliance.format.signing import fingerprint_words
from appliance.store.layout import human_bytes

# 12 words = 96 bits of the manifest hash: more than a key's 8, because a manifest is what an
# attacker would try to swap, and reading 12 words aloud is still quick.
MANIFEST_WORDS = 12


def _cell(text: object) -> str:
    """A table cell: a '|' inside a value must not open a new column."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def approval_sheet(media: Media, manifest: Manifest, *, verified: bool) -> str:
    """The Markdown sheet for the bundle on ``media`` (``manifest`` parsed from its bytes)."""
    roots = [s.root for s in media.chain]
    lines = [f"# Approval sheet: bundle {manifest.channel} #{manifest.sequence}", ""]
    if verified:
        newest = max((r.version for r in roots), default=None)
        lines.append("Signatures **verified** against the site's trusted root"
                     + (f" (carried chain up to v{newest})." if newest else "."))
    else:
        lines.append("**UNVERIFIED**: signatures not checked. Run `appliance bundle verify` "
                     "before approving.")
    lines += [
        "",
        f"- Created {format_timestamp(manifest.created)}, expires "
        f"{format_timestamp(manifest.expires)}",
        f"- {len(manifest.models)} model(s), {human_bytes(manifest.total_bytes)} in all, on "
        f"{media.volume_count} volume(s)"
        + (f" + {len(manifest.parity.volumes)} parity volume(s): any "
           f"{len(manifest.parity.volumes)} lost can be rebuilt" if manifest.parity else ""),
        "",
        "## Models",
        "",
        "| model | version | licence | size | architecture | quantization | parameters | files |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in manifest.models:
        g = model.gguf
        params = f"{g.parameter_count:,}" if g and g.parameter_count is not None else "-"
        oms = any(f.path == OMS_SIGNATURE_NAME for f in model.files)
        lines.append("| " + " | ".join(_cell(v) for v in (
            model.name, model.version, model.license,
            f"{human_bytes(model.size)} ({model.size:,} bytes)",
            g.architecture if g else "-", (g.quantization or "-") if g else "-", params,
            f"{len(model.files)}" + (" (OMS-signed)" if oms else ""))) + " |")
    lines += ["", "## Signers", "", "| name | key id | key words |", "|---|---|---|"]
    by_id = {kid: r.keys[kid] for r in sorted(roots, key=lambda r: r.version) for kid in r.keys}
    for kid, name in signer_names((s.key_id for s in media.signatures), roots):
        words = fingerprint_words(by_id[kid].public) if kid in by_id else "-"
        lines.append(f"| {_cell(name or '(in no carried trust root)')} | `{kid}` | {words} |")
    carried = ", ".join(f"v{r.version} `{r.fingerprint}`" for r in roots) or "none"
    lines += [
        "",
        f"Trust roots carried: {carried}",
        "",
        "## Manifest digest (read aloud to the publisher)",
        "",
        f"BLAKE3 `{media.manifest_hash}`",
        "",
        f"**{fingerprint_words(media.manifest_bytes, MANIFEST_WORDS)}**",
        "",
        "## Decision",
        "",
        "- [ ] approved  - [ ] refused",
        "",
        "Name: ____________________  Date: ____________  Signature: ____________________",
        "",
    ]
    return "\n".join(lines)


def sheet_html(markdown: str, title: str) -> str:
    """A standalone HTML page of the sheet (print it from a browser)."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = ("body{font-family:sans-serif;max-width:48em;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n{body}</body></html>\n")
