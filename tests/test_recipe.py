"""Recipes and sizes: what a bundle author writes, and every way it can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.bundle.recipe import load_recipe, parse_recipe, parse_size
from appliance.bundle.sources import resolve_source
from appliance.errors import RecipeError, UsageError
from appliance.limits import Limits

GOOD = b"""\
channel: site-models
sequence: 4
expires_days: 90
trust: [../roots/root-1.yaml]
models:
  - name: acme/gemma
    version: q4_k_m
    license: gemma
    files:
      - path: models/a.gguf
      - path: /abs/b.gguf
        dest: sub/b.gguf
      - hf: {repo: org/model, file: dir/c.gguf, revision: abc123}
      - hf: org/model/d.gguf
      - default: gemma3-270m
"""


@pytest.mark.parametrize(
    ("text", "value"),
    [("123", 123), ("700M", 700_000_000), ("4G", 4_000_000_000), ("4GB", 4_000_000_000),
     ("4GiB", 4 * 2**30), ("512kib", 512 * 1024), ("1.5G", 1_500_000_000), (" 2T ", 2 * 10**12),
     (4096, 4096)],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1", "0", "4X", "1.5", "4iB", "4 G B", True, 0])
def test_parse_size_refuses(text: str | int) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_good_recipe(tmp_path: Path) -> None:
    recipe = parse_recipe(GOOD, tmp_path)
    assert (recipe.channel, recipe.sequence, recipe.expires_days) == ("site-models", 4, 90)
    assert recipe.trust == (tmp_path / "../roots/root-1.yaml",)
    (model,) = recipe.models
    kinds = [(f.kind, f.dest) for f in model.files]
    assert kinds == [("path", "a.gguf"), ("path", "sub/b.gguf"), ("hf", "c.gguf"),
                     ("hf", "d.gguf"), ("default", "")]
    assert model.files[0].location == str(tmp_path / "models/a.gguf")
    assert model.files[1].location == "/abs/b.gguf"
    assert (model.files[2].repo, model.files[2].location, model.files[2].revision) == (
        "org/model", "dir/c.gguf", "abc123")
    assert (model.files[3].repo, model.files[3].location) == ("org/model", "d.gguf")


def test_defaults(tmp_path: Path) -> None:
    recipe = parse_recipe(b"channel: c\nsequence: 1\nmodels:\n  - name: m\n    version: v\n"
                          b"    files:\n      - path: x.bin\n", tmp_path)
    assert recipe.expires_days == 365 and recipe.trust == ()
    assert recipe.models[0].license == "unspecified"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"sequence: 4", b"sequence: 0"),
        (b"sequence: 4", b"sequence: four"),
        (b"expires_days: 90", b"expires_days: 0"),
        (b"channel: site-models", b"channel: ../up"),
        (b"name: acme/gemma", b"name: ../gemma"),
        (b"version: q4_k_m", b"version: q4/k"),
        (b"license: gemma", b"license: ''"),
        (b"      - default: gemma3-270m", b"      - {}"),
        (b"      - default: gemma3-270m", b"      - {path: a, default: gemma3-270m}"),
        (b"      - default: gemma3-270m", b"      - {path: e.gguf, size: 3}"),
        (b"        dest: sub/b.gguf", b"        dest: ../b.gguf"),
        (b"        dest: sub/b.gguf", b"        dest: a.gguf"),
        (b"hf: org/model/d.gguf", b"hf: org/d.gguf"),
        (b"revision: abc123", b"revision: ''"),
        (b"trust: [../roots/root-1.yaml]", b"trust: [1, 2]"),
        (b"channel: site-models", b"channel: site-models\nsurprise: 1"),
        (b"models:", b"nomodels:"),
        (b"sequence: 4", b"sequence: 4\nsequence: 5"),
        (b"license: gemma", b"license: &l gemma\n    extra: *l"),
    ],
)
def test_bad_recipes_are_recipe_errors(tmp_path: Path, old: bytes, new: bytes) -> None:
    assert old in GOOD
    with pytest.raises(RecipeError):
        parse_recipe(GOOD.replace(old, new), tmp_path)


def test_duplicate_model_is_refused(tmp_path: Path) -> None:
    text = GOOD + b"  - name: acme/gemma\n    version: q4_k_m\n    files:\n      - path: z\n"
    with pytest.raises(RecipeError, match="twice"):
        parse_recipe(text, tmp_path)


def test_recipe_over_the_size_cap(tmp_path: Path) -> None:
    with pytest.raises(RecipeError):
        parse_recipe(GOOD, tmp_path, Limits(max_recipe_bytes=100))


def test_missing_recipe_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_recipe(tmp_path / "none.yaml")


def test_path_source_resolves_and_refuses_directories(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.gguf").write_bytes(b"GGUF")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_bytes(GOOD)
    spec = load_recipe(recipe_path).models[0].files[0]
    resolved = resolve_source(spec)
    assert resolved.local_path == tmp_path / "models" / "a.gguf"
    assert resolved.label == "path:models/a.gguf" and resolved.dest == "a.gguf"
    (tmp_path / "models" / "a.gguf").unlink()
    (tmp_path / "models" / "a.gguf").mkdir()
    with pytest.raises(RecipeError, match="not a regular file"):
        resolve_source(spec)


def test_unknown_default_model(tmp_path: Path) -> None:
    text = GOOD.replace(b"default: gemma3-270m", b"default: llama-70b")
    spec = parse_recipe(text, tmp_path).models[0].files[4]
    with pytest.raises(RecipeError, match="not an embedded model"):
        resolve_source(spec)
