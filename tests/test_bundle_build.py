"""Building bundles: layout, dedup, compression, volumes, packs, crash safety, memory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_helpers import (
    MIB,
    NOW,
    build,
    make_sources,
    root_file,
    sparse_file,
    tree,
    trusted,
    write_recipe,
)
from trust_helpers import make_root, private

from appliance.bundle.builder import build_bundle
from appliance.bundle.media import parse_index
from appliance.bundle.reader import open_media
from appliance.bundle.recipe import load_recipe, parse_size
from appliance.bundle.signers import add_signature
from appliance.bundle.verify import verify_media
from appliance.errors import (
    FormatError,
    MediaError,
    RecipeError,
    UsageError,
)
from appliance.format.manifest import parse_manifest
from appliance.format.signing import key_id, public_bytes
from appliance.limits import DEFAULT_PACK_BYTES, MAX_CHUNK_BYTES

REPO = Path(__file__).resolve().parents[1]


def test_single_volume_layout_and_manifest(tmp_path: Path, tiny_gguf: Path) -> None:
    models = make_sources(tmp_path, tiny_gguf)
    recipe = write_recipe(tmp_path, files=("tiny.gguf", "weights.bin", "notes.txt"))
    result = build(tmp_path, recipe=recipe)
    media = tmp_path / "media"
    assert result.volumes == (media,)
    p1 = key_id(public_bytes(private("p1")))
    assert sorted(p.name for p in media.iterdir()) == [
        "index.bin", "manifest.yaml", "packs", "signatures", "trust"]
    assert [p.name for p in (media / "signatures").iterdir()] == [f"{p1}.sig"]
    assert [p.name for p in (media / "trust").iterdir()] == ["root-1.yaml"]
    manifest = parse_manifest((media / "manifest.yaml").read_bytes())
    assert manifest == result.manifest
    assert (manifest.channel, manifest.sequence) == ("site-models", 1)
    assert manifest.created == NOW and (manifest.expires - NOW).days == 30
    model = manifest.models[0]
    assert [f.path for f in model.files] == ["tiny.gguf", "weights.bin", "notes.txt"]
    for file, source in zip(model.files, model.provenance.sources, strict=True):
        data = (models / file.path).read_bytes()
        assert file.size == len(data)
        assert source.sha256 == hashlib.sha256(data).hexdigest()
        assert source.source == f"path:models/{file.path}"
    assert model.provenance.builder.startswith("appliance ")
    assert model.gguf is not None and model.gguf.architecture == "llama"
    assert model.gguf.chat_template_hash is not None
    assert result.signers == (p1,)
    assert result.total_bytes == sum(f.size for f in model.files)


def test_compressible_chunks_are_compressed_and_random_ones_raw(tmp_path: Path) -> None:
    make_sources(tmp_path)
    result = build(tmp_path)
    index = parse_index((tmp_path / "media" / "index.bin").read_bytes())
    by_digest = {e.digest.hex(): e for e in index.entries}
    files = {f.path: f for f in result.manifest.models[0].files}
    for chunk in files["weights.bin"].chunks:
        entry = by_digest[chunk.digest]
        assert not entry.compressed and entry.stored_length == chunk.length
    (notes,) = files["notes.txt"].chunks
    assert by_digest[notes.digest].compressed
    assert by_digest[notes.digest].stored_length < notes.length // 20
    assert result.stored_bytes < result.total_bytes


def test_identical_chunks_are_stored_once(tmp_path: Path) -> None:
    make_sources(tmp_path)
    twin = """  - name: acme/twin
    version: q8_0
    files:
      - path: models/weights.bin
        dest: same-weights.bin
"""
    result = build(tmp_path, recipe=write_recipe(tmp_path, extra_models=twin))
    weights = result.manifest.models[0].files[0]
    assert result.chunk_count == result.unique_chunk_count + len(weights.chunks)
    assert result.unique_bytes == result.total_bytes - weights.size
    packs = sum(p.stat().st_size for p in (tmp_path / "media" / "packs").iterdir())
    assert packs == result.stored_bytes < weights.size * 1.1
    report = verify_media([tmp_path / "media"], trusted(), NOW)
    assert report.chunks_verified == result.unique_chunk_count


def _with_chat_template(source: Path, target: Path) -> Path:
    script = shutil.which("gguf-new-metadata", path=str(Path(sys.executable).parent))
    argv = [script] if script else [sys.executable, "-m", "gguf.scripts.gguf_new_metadata"]
    argv += [str(source), str(target), "--chat-template", "{{ messages }}", "--force"]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    return target


def test_chat_template_edit_adds_only_the_header(tmp_path: Path,
                                                 many_tensor_gguf: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(many_tensor_gguf, models / "base.gguf")
    edited = _with_chat_template(models / "base.gguf", models / "edited.gguf")
    second = """  - name: acme/tiny
    version: templated
    files:
      - path: models/edited.gguf
"""
    result = build(tmp_path, recipe=write_recipe(tmp_path, files=("base.gguf",),
                                                 extra_models=second))
    base_size = (models / "base.gguf").stat().st_size
    added = result.unique_bytes - base_size
    assert 0 < added < edited.stat().st_size // 100
    assert result.manifest.models[1].gguf is not None
    assert result.manifest.models[1].gguf.chat_template_hash is not None
    verify_media([tmp_path / "media"], trusted(), NOW)


def test_volumes_split_and_each_verifies_alone(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=30)
    result = build(tmp_path, volume_size=parse_size("20M"), pack_size=MAX_CHUNK_BYTES)
    media = tmp_path / "media"
    names = sorted(p.name for p in media.iterdir())
    assert len(names) >= 3 and names == [f"vol-{i:03d}" for i in range(1, len(names) + 1)]
    seen: set[bytes] = set()
    for volume in result.volumes:
        assert sum(tree(volume).values()) <= parse_size("20M")
        for pack in (volume / "packs").iterdir():
            assert pack.stat().st_size <= MAX_CHUNK_BYTES
        report = verify_media([volume], trusted(), NOW)
        assert report.volumes_present == (volume.name,)
        assert len(report.volumes_missing) == len(names) - 1
        digests = {e.digest for e in parse_index((volume / "index.bin").read_bytes()).entries}
        assert not digests & seen
        seen |= digests
    assert len(seen) == result.unique_chunk_count


def test_volume_size_too_small_is_a_usage_error(tmp_path: Path) -> None:
    make_sources(tmp_path)
    with pytest.raises(UsageError, match="too small"):
        build(tmp_path, volume_size=parse_size("5M"))
    assert not (tmp_path / "media").exists()


@pytest.mark.parametrize("size", [MAX_CHUNK_BYTES - 1, 4 << 30])
def test_pack_size_outside_limits_is_a_usage_error(tmp_path: Path, size: int) -> None:
    make_sources(tmp_path)
    with pytest.raises(UsageError, match="pack size"):
        build(tmp_path, pack_size=size)
    assert DEFAULT_PACK_BYTES < 4 << 30


def test_out_must_be_new_or_empty(tmp_path: Path) -> None:
    make_sources(tmp_path)
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        build(tmp_path)
    assert tree(tmp_path / "media") == {"keep.txt": 4}
    with pytest.raises(UsageError, match="parent"):
        build(tmp_path, out="missing/media")


def test_empty_out_dir_is_used(tmp_path: Path) -> None:
    make_sources(tmp_path)
    (tmp_path / "media").mkdir()
    build(tmp_path)
    assert (tmp_path / "media" / "manifest.yaml").is_file()


class Stop(BaseException):
    pass


@pytest.mark.parametrize("precreate", [False, True])
def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path,
                                                              precreate: bool) -> None:
    make_sources(tmp_path, random_mib=12)
    recipe = write_recipe(tmp_path)
    root = root_file(tmp_path)
    before = tree(tmp_path)
    if precreate:
        (tmp_path / "media").mkdir()

    def progress(done: int, total: int) -> None:
        if done > total // 2:
            raise Stop()

    with pytest.raises(Stop):
        build_bundle(recipe, [private("p1")], tmp_path / "media", trust_chain=[root],
                     progress=progress, now=NOW)
    assert tree(tmp_path) == before
    if precreate:
        assert list((tmp_path / "media").iterdir()) == []
    else:
        assert not (tmp_path / "media").exists()


def test_nothing_is_written_outside_out(tmp_path: Path) -> None:
    make_sources(tmp_path)
    recipe = write_recipe(tmp_path)
    root = root_file(tmp_path)
    before = tree(tmp_path)
    build_bundle(recipe, [private("p1")], tmp_path / "media", trust_chain=[root], now=NOW)
    after = tree(tmp_path)
    outside = {k: v for k, v in after.items() if not k.startswith("media/")}
    assert outside == before
    assert not [p for p in (tmp_path / "media").iterdir() if p.name.startswith(".")]


def test_stale_staging_dir_from_a_killed_build_is_cleared(tmp_path: Path) -> None:
    make_sources(tmp_path)
    stale = tmp_path / "media" / ".appliance-build-1-dead"
    (stale / "vol-001" / "packs").mkdir(parents=True)
    build(tmp_path)
    assert not stale.exists()


def test_signing_key_must_be_a_publisher_of_the_carried_root(tmp_path: Path) -> None:
    make_sources(tmp_path)
    with pytest.raises(UsageError, match="not a publisher"):
        build(tmp_path, keys=("mallory",))
    with pytest.raises(UsageError, match="not a publisher"):
        build(tmp_path, keys=("r1",))
    with pytest.raises(UsageError, match="at least one"):
        build(tmp_path, keys=())


def test_trust_chain_with_a_gap_is_refused(tmp_path: Path) -> None:
    make_sources(tmp_path)
    one = root_file(tmp_path)
    three = root_file(tmp_path, make_root(version=3))
    with pytest.raises(UsageError, match="gap"):
        build_bundle(write_recipe(tmp_path), [private("p1")], tmp_path / "media",
                     trust_chain=[one, three], now=NOW)
    with pytest.raises(UsageError, match="not a trust root"):
        build_bundle(write_recipe(tmp_path), [private("p1")], tmp_path / "media",
                     trust_chain=[tmp_path / "models" / "notes.txt"], now=NOW)


def test_recipe_trust_field_is_carried(tmp_path: Path) -> None:
    make_sources(tmp_path)
    root_file(tmp_path)
    recipe = write_recipe(tmp_path, trust=["root-1.yaml"])
    build_bundle(recipe, [private("p1")], tmp_path / "media", now=NOW)
    assert (tmp_path / "media" / "trust" / "root-1.yaml").is_file()


def test_add_signature_cosigns_every_volume(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=30)
    build(tmp_path, volume_size=parse_size("20M"))
    sig = add_signature(tmp_path / "media", private("p2"))
    for volume in sorted((tmp_path / "media").iterdir()):
        assert (volume / "signatures" / f"{sig.key_id}.sig").read_bytes() == sig.to_bytes()
    assert len(open_media([tmp_path / "media"]).signatures) == 2


def test_add_signature_refuses_mismatched_volumes(tmp_path: Path) -> None:
    make_sources(tmp_path, random_mib=30)
    build(tmp_path, volume_size=parse_size("20M"))
    manifest = tmp_path / "media" / "vol-002" / "manifest.yaml"
    manifest.write_bytes(manifest.read_bytes().replace(b"sequence: 1", b"sequence: 2"))
    with pytest.raises(FormatError):
        add_signature(tmp_path / "media", private("p2"))
    with pytest.raises(MediaError):
        add_signature(tmp_path / "models", private("p2"))


def test_missing_source_file_is_a_recipe_error(tmp_path: Path) -> None:
    make_sources(tmp_path)
    with pytest.raises(RecipeError, match="does not exist"):
        build(tmp_path, recipe=write_recipe(tmp_path, files=("nope.gguf",)))
    assert not (tmp_path / "media").exists()


def test_all_empty_files_is_a_recipe_error(tmp_path: Path) -> None:
    make_sources(tmp_path)
    (tmp_path / "models" / "empty.bin").write_bytes(b"")
    with pytest.raises(RecipeError, match="empty"):
        build(tmp_path, recipe=write_recipe(tmp_path, files=("empty.bin",)))


def test_empty_file_beside_others_builds(tmp_path: Path) -> None:
    make_sources(tmp_path)
    (tmp_path / "models" / "empty.bin").write_bytes(b"")
    result = build(tmp_path, recipe=write_recipe(tmp_path, files=("empty.bin", "notes.txt")))
    assert result.manifest.models[0].files[0].chunks == ()
    verify_media([tmp_path / "media"], trusted(), NOW)


def test_default_recipe_in_the_repo_names_the_embedded_model() -> None:
    recipe = load_recipe(REPO / "bundles" / "default.yaml")
    (model,) = recipe.models
    assert model.name == "gemma3-270m" and model.license == "gemma"
    assert [f.kind for f in model.files] == ["default"]


@pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is not None,
                    reason="huggingface_hub is installed")
def test_hf_source_without_huggingface_hub_is_a_usage_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("channel: c\nsequence: 1\nmodels:\n  - name: m\n    version: v\n"
                      "    files:\n      - hf: {repo: org/model, file: m.gguf}\n")
    with pytest.raises(UsageError, match="huggingface_hub"):
        build_bundle(recipe, [private("p1")], tmp_path / "media", now=NOW)
    assert not (tmp_path / "media").exists()


_RSS_SCRIPT = """
import json, sys
from pathlib import Path

def peak_kib():  # VmHWM, not ru_maxrss: that one carries over the forking pytest's peak
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))

sys.path.insert(0, {tests!r})
from bundle_helpers import NOW, build, trusted, write_recipe
from appliance.bundle.verify import verify_media
base = Path({base!r})
result = build(base, recipe=write_recipe(base, files=("big.bin",)))
build_rss = peak_kib()
report = verify_media([base / "media"], trusted(), NOW)
print(json.dumps({{"build_kib": build_rss,
                  "total_kib": peak_kib(),
                  "bytes": report.plain_bytes, "unique": result.unique_chunk_count}}))
"""


@pytest.mark.slow
def test_memory_stays_flat_for_a_multi_gb_model(tmp_path: Path) -> None:
    size = 2 * 1024 * MIB + 12345
    (tmp_path / "models").mkdir()
    sparse_file(tmp_path / "models" / "big.bin", size)
    script = _RSS_SCRIPT.format(tests=str(Path(__file__).parent), base=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, timeout=900)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["bytes"] == size
    assert facts["unique"] >= 512
    assert facts["build_kib"] < 300 * 1024, facts
    assert facts["total_kib"] < 300 * 1024, facts
