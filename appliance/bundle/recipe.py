"""Bundle recipes: the YAML a builder writes to say what goes into a bundle.

A recipe (see bundles/README.md for the full schema)::

    channel: site-models
    sequence: 1
    expires_days: 365
    trust: [../keys/root-1.yaml]        # optional: trust roots to carry, oldest first
    models:
      - name: gemma3-270m
        version: q4_k_m
        license: gemma
        files:
          - path: models/gemma-3-270m-q4_k_m.gguf     # or  hf: {repo: ..., file: ...}
            dest: gemma-3-270m-q4_k_m.gguf            # optional name in the bundle
          - default: gemma3-270m                      # the embedded default model
          - hf: {repo: org/name, file: x-f16.gguf, revision: main, download: false}
            quantize: Q4_K_M                          # llama.cpp type, made at build
            imatrix: imatrix.gguf                     # optional importance matrix

Relative paths (``path:``, ``imatrix:``, ``trust:``) are relative to the recipe's directory.
Recipes are read with the hostile-YAML loader (size cap, no aliases); every problem is a
``RecipeError`` naming the field.

Public API: ``load_recipe(path) -> Recipe``, ``parse_recipe(data, base_dir) -> Recipe``,
``parse_size(text) -> int``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from appliance.bundle.quantize import QUANT_TYPES, quantized_dest
from appliance.errors import FormatError, RecipeError, UsageError
from appliance.format import fields, yamlsafe
from appliance.format.manifest import check_path, check_unique_paths
from appliance.limits import DEFAULT_LIMITS, Limits

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
MAX_EXPIRES_DAYS = 36500
_MAX_NAME_BYTES = 200
SOURCE_KINDS = ("path", "hf", "default", "ollama")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


def parse_size(text: str | int) -> int:
    """Bytes from ``123``, ``700M``, ``4G``, ``4GB`` (powers of 1000, as media are sold) or
    ``4GiB``, ``512KiB`` (powers of 1024). ``UsageError`` when it is not a positive size."""
    if isinstance(text, bool):
        raise UsageError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"size must be positive, got {text}")
        return text
    match = _SIZE.fullmatch(text)
    if not match or (match.group(3) and not match.group(2)):
        raise UsageError(f"not a size: {text!r} (try 700M, 4G, 4GiB or a byte count)")
    number, unit, binary, _ = match.groups()
    base = 1024 if binary else 1000
    value = float(number) * base ** _POWERS[unit.lower()]
    if value < 1 or value != value or value > 1 << 62:
        raise UsageError(f"size out of range: {text!r}")
    if "." in number and unit == "":
        raise UsageError(f"a byte count must be whole: {text!r}")
    return int(value)


@dataclass(frozen=True)
class FileSpec:
    """One file of a model. ``kind`` is ``path``, ``hf`` or ``default``.

    ``path``: ``location`` is the local path (absolute after loading). ``hf``: ``repo``,
    ``location`` (file in the repo), ``revision``, ``download`` (may fetch when not cached).
    ``default``: ``location`` names the embedded model. ``dest`` is the file's path inside
    the bundle. ``quantize``: a llama.cpp type (``Q4_K_M``) to quantize the source to at build,
    with an optional ``imatrix`` file (absolute path).
    """

    kind: str
    location: str
    dest: str
    repo: str | None = None
    revision: str | None = None
    written: str = ""  # the value as the recipe wrote it, for provenance
    download: bool = False  # hf: only; offline (cache only) unless the recipe says so
    quantize: str | None = None
    imatrix: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    license: str
    files: tuple[FileSpec, ...]


@dataclass(frozen=True)
class Recipe:
    path: Path | None
    channel: str
    sequence: int
    expires_days: int
    models: tuple[ModelSpec, ...]
    trust: tuple[Path, ...]  # root files to carry, as written (resolved against the recipe)
    description: str | None = None


def load_recipe(path: Path, limits: Limits = DEFAULT_LIMITS) -> Recipe:
    """Read and check a recipe file. Missing file: ``UsageError``; bad content: ``RecipeError``."""
    try:
        with path.open("rb") as f:
            data = f.read(limits.max_recipe_bytes + 1)
    except FileNotFoundError as e:
        raise UsageError(f"recipe {path} does not exist") from e
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e}") from e
    recipe = parse_recipe(data, path.resolve().parent, limits, what=f"recipe {path}")
    return Recipe(path=path, channel=recipe.channel, sequence=recipe.sequence,
                  expires_days=recipe.expires_days, models=recipe.models, trust=recipe.trust,
                  description=recipe.description)


def parse_recipe(data: bytes, base_dir: Path, limits: Limits = DEFAULT_LIMITS, *,
                 what: str = "recipe") -> Recipe:
    try:
        root = yamlsafe.load(data, max_bytes=limits.max_recipe_bytes,
                             max_depth=limits.max_yaml_depth, what=what)
    except FormatError as e:
        raise RecipeError(str(e)) from e
    top = fields.record(root, {"channel", "sequence", "models"}, what,
                        optional={"expires_days", "trust", "description"}, error=RecipeError)
    channel = _name(top["channel"], f"{what}: channel", allow_slash=False)
    sequence = fields.sequence_number(top["sequence"], f"{what}: sequence", error=RecipeError)
    expires_days = fields.integer(top.get("expires_days", 365), f"{what}: expires_days",
                                  minimum=1, maximum=MAX_EXPIRES_DAYS, error=RecipeError)
    description = top.get("description")
    if description is not None and not isinstance(description, str):
        raise RecipeError(f"{what}: description must be a string")
    trust_raw = top.get("trust", [])
    if isinstance(trust_raw, str):
        trust_raw = [trust_raw]
    if not isinstance(trust_raw, list) or not all(isinstance(t, str) and t for t in trust_raw):
        raise RecipeError(f"{what}: trust must be a list of root file paths")
    trust = tuple(_local_path(t, base_dir) for t in trust_raw)
    models_raw = top["models"]
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError(f"{what}: models must be a non-empty list")
    if len(models_raw) > limits.max_models:
        raise RecipeError(f"{what}: more than {limits.max_models} models")
    models = tuple(_model(m, f"{what}: models[{i}]", base_dir, limits)
                   for i, m in enumerate(models_raw))
    seen: set[tuple[str, str]] = set()
    for model in models:
        if (model.name, model.version) in seen:
            raise RecipeError(f"{what}: model {model.name} {model.version} appears twice")
        seen.add((model.name, model.version))
    return Recipe(path=None, channel=channel, sequence=sequence, expires_days=expires_days,
                  models=models, trust=trust, description=description)


def _model(raw: object, where: str, base_dir: Path, limits: Limits) -> ModelSpec:
    m = fields.record(raw, {"name", "version", "files"}, where, optional={"license"},
                      error=RecipeError)
    name = _name(m["name"], f"{where}.name", allow_slash=True)
    where = f"model {name}"
    version = _name(m["version"], f"{where}: version", allow_slash=False)
    license_ = m.get("license", "unspecified")
    if not isinstance(license_, str) or not license_.strip():
        raise RecipeError(f"{where}: license must be a non-empty string")
    files_raw = m["files"]
    if not isinstance(files_raw, list) or not files_raw:
        raise RecipeError(f"{where}: files must be a non-empty list")
    if len(files_raw) > limits.max_files_per_model:
        raise RecipeError(f"{where}: more than {limits.max_files_per_model} files")
    files = tuple(_file(f, f"{where}: files[{i}]", base_dir, limits)
                  for i, f in enumerate(files_raw))
    from appliance.bundle.ollama_source import with_sidecars
    files = with_sidecars(files)  # an ollama: GGUF brings its template and params along
    try:
        check_unique_paths([f.dest for f in files], where)
    except FormatError as e:
        raise RecipeError(f"{e} (set dest: to tell them apart)") from e
    return ModelSpec(name=name, version=version, license=license_, files=files)


def _file(raw: object, where: str, base_dir: Path, limits: Limits) -> FileSpec:
    m = fields.mapping(raw, where, error=RecipeError)
    kinds = [k for k in SOURCE_KINDS if k in m]
    if len(kinds) != 1:
        named = ", ".join(f"{k}:" for k in SOURCE_KINDS)
        raise RecipeError(f"{where}: give exactly one of {named}")
    kind = kinds[0]
    fields.keys(m, {kind}, {"dest", "quantize", "imatrix"}, where, error=RecipeError)
    value = m[kind]
    repo = revision = None
    download = False
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{where}: path must be a non-empty string")
        location = str(_local_path(value, base_dir))
        default_dest = PurePosixPath(value.replace("\\", "/")).name
    elif kind == "hf":
        repo, location, revision, download = _hf(value, where)
        default_dest = PurePosixPath(location).name
    elif kind == "ollama":  # a local Ollama store: appliance/bundle/ollama_source.py
        from appliance.bundle.ollama_source import recipe_fields
        repo, location, revision, default_dest = recipe_fields(value, where, base_dir)
    else:
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{where}: default must name the embedded model")
        location = value
        default_dest = ""  # known only once the embedded model is located
    quantize, imatrix = _quantize(m, where, base_dir)
    if quantize is not None and default_dest:
        default_dest = quantized_dest(default_dest, quantize)
    dest = m.get("dest", default_dest)
    if dest:
        try:
            check_path(dest, where, limits)
        except FormatError as e:
            raise RecipeError(f"{where}: bad dest: {e}") from e
    return FileSpec(kind=kind, location=location, dest=dest, repo=repo, revision=revision,
                    written=value if isinstance(value, str) else "", download=download,
                    quantize=quantize, imatrix=imatrix)


def _quantize(m: dict[str, object], where: str, base_dir: Path
              ) -> tuple[str | None, str | None]:
    """``quantize: Q4_K_M`` (any case) and ``imatrix: FILE``, which needs ``quantize:``."""
    raw, imatrix_raw = m.get("quantize"), m.get("imatrix")
    if raw is None:
        if imatrix_raw is not None:
            raise RecipeError(f"{where}: imatrix: needs quantize:")
        return None, None
    if not isinstance(raw, str) or raw.upper() not in QUANT_TYPES:
        raise RecipeError(f"{where}: quantize: {raw!r} is not a llama.cpp quantization type "
                          f"(one of {', '.join(QUANT_TYPES)})")
    if imatrix_raw is None:
        return raw.upper(), None
    if not isinstance(imatrix_raw, str) or not imatrix_raw:
        raise RecipeError(f"{where}: imatrix must be a file path")
    return raw.upper(), str(_local_path(imatrix_raw, base_dir))


def _hf(value: object, where: str) -> tuple[str, str, str | None, bool]:
    """``{repo: org/name, file: x.gguf, revision: main, download: false}`` or the shorthand
    ``org/name/x.gguf`` (never downloads)."""
    if isinstance(value, str):
        parts = value.split("/")
        if len(parts) < 3 or not all(parts):
            raise RecipeError(f"{where}: hf: shorthand is ORG/REPO/FILE")
        return "/".join(parts[:2]), "/".join(parts[2:]), None, False
    m = fields.record(value, {"repo", "file"}, f"{where} hf",
                      optional={"revision", "download"}, error=RecipeError)
    repo, file, revision = m["repo"], m["file"], m.get("revision")
    download = m.get("download", False)
    if not isinstance(download, bool):
        raise RecipeError(f"{where}: hf download must be true or false")
    if not isinstance(repo, str) or repo.count("/") != 1 or not all(repo.split("/")):
        raise RecipeError(f"{where}: hf repo must look like ORG/NAME")
    if not isinstance(file, str) or not file or file.startswith("/") or ".." in file.split("/"):
        raise RecipeError(f"{where}: hf file must be a path inside the repo")
    # The revision names a file under the cache's refs/ (a branch, a tag, refs/pr/N) or a
    # snapshot directory (a commit), so it must stay a plain relative name.
    if revision is not None and (not isinstance(revision, str)
                                 or not _REVISION.fullmatch(revision)):
        raise RecipeError(f"{where}: hf revision must be a branch, tag or commit")
    return repo, file, revision, download


def _local_path(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base_dir / path


def _name(value: object, where: str, *, allow_slash: bool) -> str:
    # Under the manifest's cap, so a name a recipe accepts is one the manifest accepts too.
    return fields.name(value, where, _MAX_NAME_BYTES, slash=allow_slash, error=RecipeError)
