"""Ollama stores for the tests, written and read the way Ollama itself does, by hand.

There is no ``ollama`` binary here (only the Python client, which needs a server), so these
helpers stand in for Ollama on both sides, written from its Go source without using
``appliance.format.ollama_layout`` (so a mistake there cannot hide itself):

- ``make_ollama_store`` lays out ``blobs/`` and ``manifests/`` as ``ollama create`` /
  ``ollama pull`` leave them: blobs named ``sha256-<hex>``, the manifest and config blob as
  Go's ``json.Encoder`` writes them (compact, ``<>&`` escaped, a final newline).
- ``ollama_would_load`` follows Ollama's read path step by step and asserts each rule it
  relies on: ``manifest.Manifests`` globs ``manifests/*/*/*/*`` and keeps the paths whose four
  parts ``model.ParseNameFromFilepath`` accepts; ``ParseNamedManifest`` decodes the JSON;
  ``BlobsPath`` accepts only ``^sha256[:-][0-9a-fA-F]{64}$`` and maps ``:`` to ``-``;
  ``GetModel`` decodes the config blob into ``ConfigV2`` (a GGUF when ``model_format`` is
  empty or ``gguf``), opens the model layer as GGUF, reads template/system/license as text and
  decodes params into a map. Ollama checks blob digests when it pulls; we check them too.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

_PART = {  # types/model/name.go isValidPart, per kind
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
}
_BLOB_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")  # manifest/paths.go BlobsPath
TEMPLATE = "{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}<|user|>\n{{ .Prompt }}</s>\n"
PARAMS = '{"stop":["<|user|>","</s>"],"temperature":0.2}'
LICENSE = "Test licence: use & share.\n"


def go_json(text: str) -> bytes:
    """A JSON text as Go's encoder leaves it (the caller writes it compact)."""
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return (text + "\n").encode()


def _blob(models: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    blobs = models / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"sha256-{digest}").write_bytes(data)
    return f"sha256:{digest}", len(data)


def make_ollama_store(models: Path, gguf: bytes, *,
                      parts: tuple[str, str, str, str] = ("registry.ollama.ai", "library",
                                                          "tiny", "latest"),
                      template: str | None = TEMPLATE, params: str | None = PARAMS,
                      license_: str | None = LICENSE, extra_layers: str = "") -> Path:
    """An Ollama store holding one model; returns the manifest's path."""
    config = go_json('{"model_format":"gguf","model_family":"llama","model_families":'
                     '["llama"],"model_type":"","file_type":"F32","architecture":"amd64",'
                     '"os":"linux"}')
    config_digest, config_size = _blob(models, config)
    layers = []
    for media, data in (("model", gguf), ("template", template), ("license", license_),
                        ("params", params)):
        if data is None:
            continue
        digest, size = _blob(models, data if isinstance(data, bytes) else data.encode())
        layers.append(f'{{"mediaType":"application/vnd.ollama.image.{media}",'
                      f'"digest":"{digest}","size":{size}}}')
    text = ('{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2'
            '+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json",'
            f'"digest":"{config_digest}","size":{config_size}}},'
            f'"layers":[{",".join(layers)}{extra_layers}]}}')
    path = models.joinpath("manifests", *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(go_json(text))
    return path


def blob_path(models: Path, digest: str) -> Path:
    return models / "blobs" / digest.replace(":", "-")


def ollama_would_load(models: Path, name: str) -> dict[str, Any]:
    """What Ollama's ``GetModel`` would read for ``host/namespace/model:tag``; asserts every
    rule its code depends on. Returns the config, template, params and the model path."""
    listed = {}
    for match in sorted((models / "manifests").glob("*/*/*/*")):
        if match.is_dir():
            continue
        parts = match.relative_to(models / "manifests").parts
        kinds = ("host", "namespace", "model", "tag")
        if len(parts) == 4 and all(_PART[k].fullmatch(p) for k, p in zip(kinds, parts,
                                                                           strict=True)):
            listed[f"{parts[0]}/{parts[1]}/{parts[2]}:{parts[3]}"] = match
        else:
            # Ollama logs "bad manifest name" and skips it; an export must leave none.
            raise AssertionError(f"Ollama would skip {match}: not a valid name path")
    assert name in listed, f"Ollama would not list {name}; it lists {sorted(listed)}"
    manifest = json.loads(listed[name].read_bytes())
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    loaded: dict[str, Any] = {"licenses": []}
    for layer in [manifest["config"], *manifest["layers"]]:
        assert _BLOB_DIGEST.match(layer["digest"]), layer["digest"]
        path = blob_path(models, layer["digest"])
        data = path.read_bytes()
        assert len(data) == layer["size"], f"{path}: size differs from the manifest"
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"], path
        media = layer["mediaType"]
        if layer is manifest["config"]:
            assert media == "application/vnd.docker.container.image.v1+json"
            loaded["config"] = json.loads(data)
            assert loaded["config"].get("model_format", "") in ("", "gguf")
        elif media == "application/vnd.ollama.image.model":
            assert data[:4] == b"GGUF", f"{path} is not a GGUF file"
            loaded["model_path"] = path
        elif media in ("application/vnd.ollama.image.template",
                       "application/vnd.ollama.image.prompt"):
            loaded["template"] = data.decode()
        elif media == "application/vnd.ollama.image.params":
            loaded["params"] = json.loads(data)
            assert isinstance(loaded["params"], dict)
        elif media == "application/vnd.ollama.image.license":
            loaded["licenses"].append(data.decode())
        elif media == "application/vnd.ollama.image.system":
            loaded["system"] = data.decode()
        else:
            raise AssertionError(f"unexpected layer {media}")
    assert "model_path" in loaded, "no model layer"
    return loaded
