"""Ollama's on-disk model store, as bytes: names, manifests, config blobs and our sidecar.

Learned from Ollama's own code (``manifest/manifest.go``, ``manifest/layer.go``,
``manifest/paths.go``, ``types/model/name.go``, ``server/images.go``, ``server/create.go``),
written here anew. An Ollama store (``$OLLAMA_MODELS``, default ``~/.ollama/models``) is::

    manifests/<host>/<namespace>/<model>/<tag>     one JSON manifest per tagged model
    blobs/sha256-<64 hex>                          content-addressed layers

A name is ``[host/][namespace/]model[:tag]``, defaults ``registry.ollama.ai``, ``library``,
``latest``; each part is a letter, digit or ``_`` then letters, digits, ``_``, ``-`` and
``.`` (no ``.`` in a namespace, ``:`` only in a host for its port), 1-80 bytes (a host 350).
Those rules are what keep a name from climbing out of ``manifests/``, so a part that breaks
them is an ``UnsafePathError``.

A manifest is ``{"schemaVersion": 2, "mediaType":
"application/vnd.docker.distribution.manifest.v2+json", "config": LAYER, "layers": [LAYER..]}``,
a layer ``{"mediaType", "digest": "sha256:<hex>", "size"[, "from"][, "name"]}``. The config
blob (``application/vnd.docker.container.image.v1+json``) is Ollama's ``ConfigV2``
(``model_format``, ``model_family``, ``file_type``...). Layer kinds, by media type
``application/vnd.ollama.image.*``: ``model`` (the GGUF, exactly one here), ``template``
(Go template; ``prompt`` is its old name), ``system``, ``params`` (a JSON object of options),
``messages`` (JSON), ``license`` (any number). Ollama writes manifests and config blobs with
Go's ``json.Encoder``: compact, ``<``, ``>``, ``&`` escaped, a final newline;
``encode_go_json`` writes that same form, so a model carried out of Ollama goes back with the
manifest digest it had.

A model whose manifest also has an adapter, projector, draft or tensor layer is refused: the
GGUF alone would be a different model. The deprecated ``embed`` layer, which Ollama ignores,
is ignored here too.

The *sidecar* is our own small document that travels with the GGUF in a bundle
(``<gguf name minus .gguf>.ollama.json``): the Ollama name and manifest digest it came from,
the digest of the GGUF layer the config describes, the config blob text and each text layer
(template, system, params, messages, license) verbatim, so an export writes the same blobs
with the same digests (and knows when the GGUF is another one, quantized at build, whose
config must say so: ``patch_config``).

Pure: bytes in, objects out. Every problem is a ``FormatError`` subclass (or the caller's
class, passed as ``error``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from appliance.errors import FormatError, LimitExceededError
from appliance.format import fields

ErrorClass = fields.ErrorClass

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
_IMAGE = "application/vnd.ollama.image."
MODEL_MEDIA_TYPE = _IMAGE + "model"
TEMPLATE_MEDIA_TYPE = _IMAGE + "template"
PARAMS_MEDIA_TYPE = _IMAGE + "params"
# Text layers carried verbatim, in the manifest's order; params and messages must be JSON.
TEXT_MEDIA_TYPES = frozenset(_IMAGE + k for k in
                             ("template", "prompt", "system", "params", "messages", "license"))
_JSON_MEDIA_TYPES = {PARAMS_MEDIA_TYPE: dict, _IMAGE + "messages": list}
IGNORED_MEDIA_TYPES = frozenset({_IMAGE + "embed"})  # deprecated; Ollama ignores it too
REFUSED_MEDIA_TYPES = frozenset(_IMAGE + k for k in
                                ("adapter", "projector", "draft", "tensor", "json"))

MAX_MANIFEST_BYTES = 1 << 20  # a GGUF model's manifest is about 1 KB
MAX_CONFIG_BYTES = 1 << 20
MAX_TEXT_LAYER_BYTES = 1 << 20  # templates are KBs, long licenses some 10 KB
MAX_SIDECAR_BYTES = 8 << 20
MAX_LAYERS = 64
MAX_BLOB_BYTES = 1 << 50
SIDECAR_SUFFIX = ".ollama.json"
SIDECAR_FORMAT = "appliance-ollama-sidecar/1"

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_PART_MAX = {"host": 350, "namespace": 80, "model": 80, "tag": 80}
_PART = {
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
}


# --- names ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def short(self) -> str:
        """The form ``ollama list`` shows: defaults left out, the tag always there."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def manifest_parts(self) -> tuple[str, ...]:
        """The manifest's path under the store, one segment each."""
        return ("manifests", self.host, self.namespace, self.model, self.tag)


def _part(kind: str, value: str, where: str, error: ErrorClass) -> str:
    bad = fields.path_error(error)
    if not 1 <= len(value.encode("utf-8", "surrogatepass")) <= _PART_MAX[kind]:
        raise bad(f"{where}: the {kind} {value!r} must be 1 to {_PART_MAX[kind]} bytes")
    if not _PART[kind].fullmatch(value) or (kind == "host" and ".." in value):
        raise bad(f"{where}: {value!r} is not a valid Ollama {kind} (letters, digits, '_', "
                  "'-' and '.', starting with a letter, digit or '_')")
    return fields.segment(value, where, error=error)


def make_name(host: str, namespace: str, model: str, tag: str, *, where: str = "Ollama name",
              error: ErrorClass = FormatError) -> OllamaName:
    """A name from its four parts (as a manifest's path gives them), each checked."""
    return OllamaName(_part("host", host, where, error),
                      _part("namespace", namespace, where, error),
                      _part("model", model, where, error), _part("tag", tag, where, error))


def parse_name(text: object, *, where: str = "Ollama name",
               error: ErrorClass = FormatError) -> OllamaName:
    """``[host/][namespace/]model[:tag]`` with Ollama's defaults for what is left out."""
    if not isinstance(text, str) or not text:
        raise error(f"{where}: expected a model name like llama3.2 or library/llama3.2:1b")
    if "://" in text or "@" in text:
        raise error(f"{where}: {text!r}: give the name only, without a scheme or a digest")
    rest, tag = text, DEFAULT_TAG
    if rest.rfind(":") > rest.rfind("/"):  # '/' is not allowed in a tag, ':' is in a host
        rest, _, tag = rest.rpartition(":")
    parts = rest.split("/")
    if len(parts) > 3:
        raise fields.path_error(error)(f"{where}: {text!r} has more than host/namespace/model")
    defaults = [DEFAULT_HOST, DEFAULT_NAMESPACE][: 3 - len(parts)]
    host, namespace, model = [*defaults, *parts]
    return make_name(host, namespace, model, tag, where=where, error=error)


# --- manifests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # sha256:<hex>
    size: int
    from_: str | None = None  # Ollama's "from": where a created layer came from
    name: str | None = None  # a tensor layer's name

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @property
    def blob_name(self) -> str:
        """Its file under ``blobs/``."""
        return blob_name(self.digest)


@dataclass(frozen=True)
class OllamaManifest:
    config: Layer
    layers: tuple[Layer, ...]

    @property
    def model_layer(self) -> Layer:
        return next(layer for layer in self.layers if layer.media_type == MODEL_MEDIA_TYPE)

    @property
    def text_layers(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.media_type in TEXT_MEDIA_TYPES)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(value: object, where: str, *, error: ErrorClass = FormatError) -> str:
    """``sha256:`` and 64 lower-case hex digits, the only digests a blob may be named by."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise fields.path_error(error)(f"{where}: digest {value!r} is not sha256:<64 hex>")
    return value


def blob_name(digest: str) -> str:
    return "sha256-" + check_digest(digest, "blob").removeprefix("sha256:")


def _layer(raw: object, where: str) -> Layer:
    m = fields.record(raw, {"mediaType", "digest", "size"}, where, optional={"from", "name"})
    media_type = fields.text(m["mediaType"], f"{where} mediaType", 200)
    digest = check_digest(m["digest"], where)
    size = fields.integer(m["size"], f"{where} size", maximum=MAX_BLOB_BYTES, cap=True)
    from_ = m.get("from")
    name = m.get("name")
    for key, value in (("from", from_), ("name", name)):
        if value is not None:
            fields.text(value, f"{where} {key}", 4096)
    return Layer(media_type, digest, size, from_, name)


def parse_manifest(data: bytes, what: str = "Ollama manifest") -> OllamaManifest:
    """An Ollama manifest from hostile bytes: size cap, JSON limits, version, fields, then
    the layers this appliance can carry: exactly one GGUF model layer, text layers, and no
    layer kind that would make the GGUF alone a different model."""
    top = fields.json_object(data, what, max_bytes=MAX_MANIFEST_BYTES)
    fields.keys(top, {"schemaVersion", "mediaType", "config", "layers"}, set(), what)
    if top["schemaVersion"] != 2 or type(top["schemaVersion"]) is not int:
        raise FormatError(f"{what}: schemaVersion {top['schemaVersion']!r}, expected 2")
    if top["mediaType"] != MANIFEST_MEDIA_TYPE:
        raise FormatError(f"{what}: mediaType {top['mediaType']!r}, expected "
                          f"{MANIFEST_MEDIA_TYPE}")
    config = _layer(top["config"], f"{what} config")
    if config.media_type != CONFIG_MEDIA_TYPE:
        raise FormatError(f"{what}: config mediaType {config.media_type!r}, expected "
                          f"{CONFIG_MEDIA_TYPE}")
    raw_layers = fields.items(top["layers"], f"{what} layers", max_items=MAX_LAYERS,
                              nonempty=True)
    layers = tuple(_layer(r, f"{what} layers[{i}]") for i, r in enumerate(raw_layers))
    models = [layer for layer in layers if layer.media_type == MODEL_MEDIA_TYPE]
    if len(models) != 1:
        raise FormatError(f"{what}: {len(models)} model layers; exactly one GGUF is carried")
    for layer in layers:
        kind = layer.media_type
        if kind in REFUSED_MEDIA_TYPES:
            raise FormatError(f"{what}: a {kind.removeprefix(_IMAGE)} layer ({layer.digest}) "
                              "cannot be carried: the GGUF alone would be another model")
        if kind != MODEL_MEDIA_TYPE and kind not in TEXT_MEDIA_TYPES | IGNORED_MEDIA_TYPES:
            raise FormatError(f"{what}: unknown layer media type {kind!r}")
        if kind in TEXT_MEDIA_TYPES and layer.size > MAX_TEXT_LAYER_BYTES:
            raise LimitExceededError(f"{what}: {kind} layer of {layer.size} bytes, over the "
                                     f"cap of {MAX_TEXT_LAYER_BYTES}")
    if config.size > MAX_CONFIG_BYTES:
        raise LimitExceededError(f"{what}: config of {config.size} bytes, over the cap of "
                                 f"{MAX_CONFIG_BYTES}")
    return OllamaManifest(config, layers)


def _layer_value(layer: Layer) -> dict[str, Any]:
    value: dict[str, Any] = {"mediaType": layer.media_type, "digest": layer.digest,
                             "size": layer.size}
    if layer.from_:  # omitempty, as Ollama's struct tags say
        value["from"] = layer.from_
    if layer.name:
        value["name"] = layer.name
    return value


def manifest_bytes(manifest: OllamaManifest) -> bytes:
    """The manifest as Ollama's ``WriteManifest`` writes it."""
    return encode_go_json({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
                           "config": _layer_value(manifest.config),
                           "layers": [_layer_value(layer) for layer in manifest.layers]})


def encode_go_json(value: Any) -> bytes:
    """JSON as Go's ``json.Encoder`` writes it: compact, keys in the order given, ``<>&`` and
    U+2028/U+2029 escaped, UTF-8, one final newline."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # These characters can only stand inside strings here, so a plain replace is exact.
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return (text + "\n").encode("utf-8")


def human_number(n: int) -> str:
    """A parameter count the way Ollama's ``format.HumanNumber`` shows it (``270.00M``)."""
    for unit, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= scale:
            number = n / scale
            places = 0 if number == int(number) else decimals
            return f"{number:.{places}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def config_bytes(*, family: str, file_type: str, parameter_count: int | None) -> bytes:
    """A ``ConfigV2`` blob for a GGUF model, fields in Ollama's order, as ``ollama create``
    fills them (``architecture``/``os`` are the image-spec fields it sets to amd64/linux)."""
    return encode_go_json({
        "model_format": "gguf",
        "model_family": family,
        "model_families": [family],
        "model_type": human_number(parameter_count) if parameter_count else "",
        "file_type": file_type,
        "architecture": "amd64",
        "os": "linux",
    })


def patch_config(config: str, *, file_type: str | None, parameter_count: int | None) -> bytes:
    """The config blob ``config`` describing another GGUF of the same model (quantized at
    build): ``file_type`` and ``model_type`` replaced, every other field kept in its order."""
    value = json.loads(config)
    if file_type:
        value["file_type"] = file_type
    if parameter_count:
        value["model_type"] = human_number(parameter_count)
    return encode_go_json(value)


def check_text_layer(media_type: str, data: bytes, where: str) -> str:
    """A text layer's bytes as text: UTF-8, under the cap; params a JSON object and
    messages a JSON array (Ollama decodes both into those shapes)."""
    if len(data) > MAX_TEXT_LAYER_BYTES:
        raise LimitExceededError(f"{where}: {len(data)} bytes, over the cap of "
                                 f"{MAX_TEXT_LAYER_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not UTF-8 text: {e}") from e
    shape = _JSON_MEDIA_TYPES.get(media_type)
    if shape is dict:
        fields.json_object(data, where, max_bytes=MAX_TEXT_LAYER_BYTES)
    elif shape is list:
        wrapped = b'{"m":' + data + b"}"  # json_object wants an object; depth counts the same
        if not isinstance(fields.json_object(wrapped, where, max_bytes=2 * MAX_TEXT_LAYER_BYTES
                                             )["m"], list):
            raise FormatError(f"{where}: messages must be a JSON array")
    return text


# --- the sidecar that travels in a bundle --------------------------------------------------


@dataclass(frozen=True)
class TextLayer:
    media_type: str
    text: str


@dataclass(frozen=True)
class Sidecar:
    name: OllamaName
    manifest_digest: str  # sha256:<hex> of the manifest the model was read from
    model_digest: str  # sha256:<hex> of its GGUF layer: the config describes that file
    config: str  # the config blob, verbatim
    layers: tuple[TextLayer, ...]  # text layers in manifest order

    def layer(self, media_type: str) -> TextLayer | None:
        return next((t for t in self.layers if t.media_type == media_type), None)


def sidecar_name(gguf_path: str) -> str:
    """The sidecar's path next to a GGUF's: ``a/b.gguf`` -> ``a/b.ollama.json``."""
    stem = gguf_path[: -len(".gguf")] if gguf_path.lower().endswith(".gguf") else gguf_path
    return stem + SIDECAR_SUFFIX


def sidecar_bytes(sidecar: Sidecar) -> bytes:
    value = {
        "format": SIDECAR_FORMAT,
        "name": str(sidecar.name),
        "manifest_digest": sidecar.manifest_digest,
        "model_digest": sidecar.model_digest,
        "config": sidecar.config,
        "layers": [{"mediaType": t.media_type, "text": t.text} for t in sidecar.layers],
    }
    return (json.dumps(value, indent=1, ensure_ascii=False, sort_keys=True) + "\n").encode()


def parse_sidecar(data: bytes, what: str = "Ollama sidecar") -> Sidecar:
    top = fields.json_object(data, what, max_bytes=MAX_SIDECAR_BYTES)
    fields.keys(top, {"format", "name", "manifest_digest", "model_digest", "config", "layers"},
                set(), what)
    if top["format"] != SIDECAR_FORMAT:
        raise FormatError(f"{what}: format {top['format']!r}, expected {SIDECAR_FORMAT}")
    name = parse_name(top["name"], where=f"{what} name")
    digest = check_digest(top["manifest_digest"], f"{what} manifest_digest")
    model_digest = check_digest(top["model_digest"], f"{what} model_digest")
    config = top["config"]
    if not isinstance(config, str) or len(config.encode()) > MAX_CONFIG_BYTES:
        raise FormatError(f"{what}: config must be the config blob's text, at most "
                          f"{MAX_CONFIG_BYTES} bytes")
    fields.json_object(config.encode(), f"{what} config", max_bytes=MAX_CONFIG_BYTES)
    layers = []
    for i, raw in enumerate(fields.items(top["layers"], f"{what} layers",
                                         max_items=MAX_LAYERS)):
        m = fields.record(raw, {"mediaType", "text"}, f"{what} layers[{i}]")
        if m["mediaType"] not in TEXT_MEDIA_TYPES or not isinstance(m["text"], str):
            raise FormatError(f"{what} layers[{i}]: not a text layer")
        check_text_layer(m["mediaType"], m["text"].encode(), f"{what} layers[{i}]")
        layers.append(TextLayer(m["mediaType"], m["text"]))
    return Sidecar(name, digest, model_digest, config, tuple(layers))

