"""CycloneDX 1.6 ML-BOM of a bundle, validated against the CycloneDX schema the library ships."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from bundle_helpers import build, make_sources, root_file, write_recipe
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from trust_helpers import kid

from appliance.bundle.reader import open_media
from appliance.bundle.sbom import bundle_sbom
from appliance.cli.main import main
from appliance.errors import EXIT_OK, EXIT_REFUSED


def _validate(text: str) -> None:
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert errors is None, errors


def test_bom_is_valid_cyclonedx_with_models_files_and_signers(two_signer_media: Path,
                                                              tmp_path: Path) -> None:
    opened = open_media([two_signer_media])
    manifest = opened.parse_unverified()
    text = bundle_sbom(opened, manifest, verified=False)
    _validate(text)
    bom = json.loads(text)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    (model,) = bom["components"]
    assert model["type"] == "machine-learning-model"
    assert (model["name"], model["version"]) == ("acme/tiny", "q4_k_m")
    assert model["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    props = {p["name"]: p["value"] for p in model["properties"]}
    gguf = manifest.models[0].gguf
    assert gguf is not None
    assert props["appliance:gguf:architecture"] == gguf.architecture == "llama"
    assert props["appliance:gguf:tensor-count"] == str(gguf.tensor_count)
    files = {f["name"]: f for f in model["components"]}
    upstream = (tmp_path / "models/tiny.gguf").read_bytes()
    assert files["tiny.gguf"]["hashes"] == [
        {"alg": "SHA-256", "content": hashlib.sha256(upstream).hexdigest()}]
    file_props = {p["name"]: p["value"] for p in files["tiny.gguf"]["properties"]}
    entry = next(f for f in manifest.models[0].files if f.path == "tiny.gguf")
    assert file_props["appliance:merkle-root"] == entry.merkle_root
    assert file_props["appliance:size"] == str(len(upstream))
    meta = bom["metadata"]
    assert sorted(a["name"] for a in meta["authors"]) == ["p1", "p2"]
    bundle_props = [(p["name"], p["value"]) for p in meta["component"]["properties"]]
    assert ("appliance:verified", "false") in bundle_props
    assert ("appliance:manifest-blake3", opened.manifest_hash) in bundle_props
    assert ("appliance:signer", f"{kid('p1')} p1") in bundle_props
    # Deterministic: the same manifest gives the same BOM on any host.
    assert bundle_sbom(open_media([two_signer_media]), manifest, verified=False) == text


def test_licence_that_is_no_spdx_id_is_a_named_licence(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=1)
    recipe = write_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("apache-2.0", "gemma"))
    build(tmp_path, recipe=recipe)
    opened = open_media([tmp_path / "media"])
    text = bundle_sbom(opened, opened.parse_unverified(), verified=True)
    _validate(text)
    (model,) = json.loads(text)["components"]
    assert model["licenses"] == [{"license": {"name": "gemma"}}]


def test_cli_sbom_and_inspect_sbom(two_signer_media: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = root_file(tmp_path)
    out = tmp_path / "bom.json"
    assert main(["bundle", "sbom", str(two_signer_media), "--trust", str(root),
                 "-o", str(out)]) == EXIT_OK
    text = out.read_text()
    _validate(text)
    props = json.loads(text)["metadata"]["component"]["properties"]
    assert {"name": "appliance:verified", "value": "true"} in props
    capsys.readouterr()
    assert main(["bundle", "inspect", str(two_signer_media), "--sbom"]) == EXIT_OK
    printed = capsys.readouterr().out
    _validate(printed)
    assert json.loads(printed)["components"][0]["name"] == "acme/tiny"


def test_cli_sbom_refuses_a_tampered_manifest_when_verifying(two_signer_media: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    manifest = two_signer_media / "manifest.yaml"
    manifest.write_bytes(manifest.read_bytes().replace(b"apache-2.0", b"apache-2.1"))
    code = main(["bundle", "sbom", str(two_signer_media), "--trust", str(root_file(tmp_path))])
    assert code == EXIT_REFUSED
    assert "bomFormat" not in capsys.readouterr().out
