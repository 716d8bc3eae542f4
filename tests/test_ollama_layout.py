"""Ollama's store layout (``format/ollama_layout.py``) and the ``ollama:`` recipe source.

The stores are real directories in tmp_path laid out by ``ollama_helpers.make_ollama_store``
(written from Ollama's Go source, not with the module under test) around the tiny GGUF.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from bundle_helpers import build, flip_byte
from ollama_helpers import LICENSE, PARAMS, TEMPLATE, blob_path, go_json, make_ollama_store

from appliance.bundle.media import MANIFEST_NAME
from appliance.bundle.ollama_source import read_model
from appliance.bundle.recipe import load_recipe
from appliance.errors import (
    FormatError,
    IntegrityError,
    LimitExceededError,
    RecipeError,
    SpecialFileError,
    TruncatedError,
    UnsafePathError,
)
from appliance.format import ollama_layout as ol
from appliance.format.manifest import parse_manifest as parse_bundle_manifest

TINY = ol.OllamaName("registry.ollama.ai", "library", "tiny", "latest")


@pytest.fixture()
def ollama_store(tmp_path: Path, tiny_gguf: Path) -> Path:
    models = tmp_path / "ollama"
    make_ollama_store(models, tiny_gguf.read_bytes())
    return models


def model_blob(models: Path) -> Path:
    manifest = json.loads(models.joinpath(*TINY.manifest_parts).read_bytes())
    return blob_path(models, manifest["layers"][0]["digest"])


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("llama3.2", "registry.ollama.ai/library/llama3.2:latest"),
    ("llama3.2:1b", "registry.ollama.ai/library/llama3.2:1b"),
    ("me/tiny:q4_K_M", "registry.ollama.ai/me/tiny:q4_K_M"),
    ("localhost:5000/team/tiny:v1", "localhost:5000/team/tiny:v1"),
])
def test_names_take_ollamas_defaults(text: str, expected: str) -> None:
    assert str(ol.parse_name(text)) == expected


@pytest.mark.parametrize("text", ["../../etc/passwd", "a/b/c/d", "tiny:..", ".hidden",
                                  "my.ns/tiny", "tiny:a/b", "x" * 81, "a//b"])
def test_names_that_could_leave_manifests_are_unsafe(text: str) -> None:
    with pytest.raises(UnsafePathError):
        ol.parse_name(text)


# --- manifests -----------------------------------------------------------------------------


def test_manifest_round_trips_in_gos_encoder_form(ollama_store: Path) -> None:
    raw = ollama_store.joinpath(*TINY.manifest_parts).read_bytes()
    manifest = ol.parse_manifest(raw)
    assert [layer.media_type.rsplit(".", 1)[1] for layer in manifest.layers] == [
        "model", "template", "license", "params"]
    assert ol.manifest_bytes(manifest) == raw  # the same bytes, so the same manifest digest
    assert ol.encode_go_json({"t": TEMPLATE}) == go_json(json.dumps(
        {"t": TEMPLATE}, separators=(",", ":")))
    assert b"\\u003c|system|\\u003e" in ol.encode_go_json({"t": TEMPLATE})


def _manifest_text(layers: str, **top: object) -> bytes:
    digest = "sha256:" + "a" * 64
    value = {"schemaVersion": 2, "mediaType": ol.MANIFEST_MEDIA_TYPE,
             "config": {"mediaType": ol.CONFIG_MEDIA_TYPE, "digest": digest, "size": 10}}
    value.update(top)
    return (json.dumps(value)[:-1] + f', "layers": {layers}}}').encode()


MODEL = '{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:%s", "size": 5}'


@pytest.mark.parametrize(("data", "error"), [
    (_manifest_text(f"[{MODEL % ('b' * 64)}]") + b" " * ol.MAX_MANIFEST_BYTES,
     LimitExceededError),
    (_manifest_text("[" * 40 + "]" * 40), FormatError),
    (_manifest_text(f"[{MODEL % ('b' * 64)}]", schemaVersion=1), FormatError),
    (_manifest_text(f"[{MODEL % ('b' * 64)}]", extra=1), FormatError),
    (_manifest_text(f"[{MODEL % '../../../../etc/passwd'}]"), UnsafePathError),
    (_manifest_text(f"[{MODEL % ('B' * 64)}]"), UnsafePathError),
    (_manifest_text(f"[{MODEL % ('b' * 64)}, {MODEL % ('c' * 64)}]"), FormatError),
    (_manifest_text("[" + (MODEL % ('b' * 64)).replace("model", "projector") + ","
                    + MODEL % ('c' * 64) + "]"), FormatError),
    (_manifest_text(f'[{MODEL % ("b" * 64)}]').replace(b'"size": 10', b'"size": 10, '
                                                       b'"size": 11'), FormatError),
])
def test_hostile_manifests_are_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        ol.parse_manifest(data)
    assert type(raised.value) is error


# --- reading a store -----------------------------------------------------------------------


def test_read_model_checks_every_blob_and_keeps_the_text_layers(ollama_store: Path,
                                                                tiny_gguf: Path) -> None:
    model = read_model(ollama_store, TINY)
    assert model.gguf_path.read_bytes() == tiny_gguf.read_bytes()
    assert model.gguf_path.name == "sha256-" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    raw = ollama_store.joinpath(*TINY.manifest_parts).read_bytes()
    assert model.manifest_digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert [(t.media_type.rsplit(".", 1)[1], t.text) for t in model.sidecar.layers] == [
        ("template", TEMPLATE), ("license", LICENSE), ("params", PARAMS)]
    assert ol.parse_sidecar(ol.sidecar_bytes(model.sidecar)) == model.sidecar


def test_a_model_blob_whose_bytes_differ_from_its_name_is_refused(ollama_store: Path) -> None:
    flip_byte(model_blob(ollama_store), 4000)
    with pytest.raises(IntegrityError) as raised:
        read_model(ollama_store, TINY)
    assert type(raised.value) is IntegrityError and "sha256" in str(raised.value)


def test_a_short_blob_is_truncated(ollama_store: Path) -> None:
    blob = model_blob(ollama_store)
    os.truncate(blob, blob.stat().st_size - 1)
    with pytest.raises(TruncatedError):
        read_model(ollama_store, TINY)


def test_a_changed_template_is_refused(ollama_store: Path) -> None:
    manifest = json.loads(ollama_store.joinpath(*TINY.manifest_parts).read_bytes())
    template = blob_path(ollama_store, manifest["layers"][1]["digest"])
    template.write_bytes(template.read_bytes().replace(b"user", b"root"))
    with pytest.raises(IntegrityError) as raised:
        read_model(ollama_store, TINY)
    assert type(raised.value) is IntegrityError


def test_an_oversize_manifest_file_is_refused_before_reading(ollama_store: Path) -> None:
    path = ollama_store.joinpath(*TINY.manifest_parts)
    with path.open("ab") as f:
        f.truncate(ol.MAX_MANIFEST_BYTES + 1)  # sparse: the cap must not read it
    with pytest.raises(LimitExceededError):
        read_model(ollama_store, TINY)


def test_special_files_in_the_store_are_refused(ollama_store: Path) -> None:
    blob = model_blob(ollama_store)
    blob.unlink()
    os.mkfifo(blob)  # a FIFO would block a reader that opened it naively
    with pytest.raises(SpecialFileError):
        read_model(ollama_store, TINY)
    path = ollama_store.joinpath(*TINY.manifest_parts)
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(SpecialFileError):
        read_model(ollama_store, TINY)


def test_a_model_not_in_the_store_names_what_is(ollama_store: Path) -> None:
    with pytest.raises(RecipeError, match="library/tiny/latest"):
        read_model(ollama_store, ol.parse_name("other"))


# --- the recipe source, built into a bundle ------------------------------------------------


def _recipe(base: Path, entry: str) -> Path:
    path = base / "recipe.yaml"
    path.write_text("channel: site-models\nsequence: 1\nexpires_days: 30\nmodels:\n"
                    "  - name: acme/tiny\n    version: q4\n    license: apache-2.0\n"
                    f"    files:\n      - {entry}\n")
    return path


def test_recipe_names_that_climb_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="namespace"):
        load_recipe(_recipe(tmp_path, "ollama: ../../etc/passwd"))


def test_ollama_source_builds_into_a_signed_bundle(tmp_path: Path, ollama_store: Path,
                                                   tiny_gguf: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama_store))  # the default store, as Ollama's
    recipe = _recipe(tmp_path, "ollama: tiny")
    spec_files = load_recipe(recipe).models[0].files
    assert [(f.kind, f.dest) for f in spec_files] == [
        ("ollama", "tiny-latest.gguf"), ("ollama-sidecar", "tiny-latest.ollama.json")]
    result = build(tmp_path, recipe=recipe)
    entry = result.manifest.models[0]
    assert [f.path for f in entry.files] == ["tiny-latest.gguf", "tiny-latest.ollama.json"]
    assert entry.gguf is not None and entry.gguf.architecture == "llama"
    raw = ollama_store.joinpath(*TINY.manifest_parts).read_bytes()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    gguf_source = entry.provenance.sources[0]
    assert gguf_source.source == f"ollama:{TINY}@{digest}"
    assert gguf_source.sha256 == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert entry.provenance.sources[1].source == f"ollama:{TINY}@{digest}#sidecar"
    # The provenance is in the signed manifest on the media, not only in the result.
    signed = parse_bundle_manifest((result.volumes[0] / MANIFEST_NAME).read_bytes())
    assert signed.models[0].provenance == entry.provenance


def test_an_explicit_store_and_a_tampered_blob_stop_the_build(tmp_path: Path,
                                                              ollama_store: Path) -> None:
    recipe = _recipe(tmp_path, "ollama: {model: 'library/tiny:latest', store: ollama}")
    assert load_recipe(recipe).models[0].files[0].location == str(ollama_store)
    blob = model_blob(ollama_store)
    flip_byte(blob, blob.stat().st_size - 100)  # in a tensor: the builder's sha256 sees it
    with pytest.raises(IntegrityError, match="upstream digest") as raised:
        build(tmp_path, recipe=recipe)
    assert type(raised.value) is IntegrityError
    flip_byte(blob, blob.stat().st_size - 100)
    flip_byte(blob, 100)  # in the header: the GGUF reader refuses it before any byte is packed
    with pytest.raises(FormatError):
        build(tmp_path, recipe=recipe, out="media2")


def test_a_config_for_a_gguf_quantized_at_build_says_so_and_keeps_the_rest() -> None:
    config = ('{"model_format":"gguf","model_family":"llama","model_families":["llama"],'
              '"model_type":"1.2B","file_type":"F16","renderer":"x","architecture":"amd64",'
              '"os":"linux"}\n')
    patched = ol.patch_config(config, file_type="Q4_K_M", parameter_count=1_235_814_400)
    assert patched == config.replace('"F16"', '"Q4_K_M"').encode()  # 1.2B stays 1.2B
    assert json.loads(ol.patch_config(config, file_type=None, parameter_count=270_000_000)
                      )["model_type"] == "270M"
