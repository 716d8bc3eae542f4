"""Split GGUF models (issue 19): the shards gguf-split writes build, import, verify and serve
as one model, and a shard that is missing or changed is refused before llama.cpp loads it.

The shards are the tiny llama rewritten by gguf-py's own split writer (``GGUFWriter`` with
``split_max_tensors``, through ``serve_helpers.copy_gguf_with``): three real GGUF files with
``split.no``/``split.count``/``split.tensors.count``, the metadata in the first, exactly as
llama.cpp's gguf-split lays them out; the first test shows llama.cpp loads them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import gguf
import httpx
import llama_cpp
import numpy as np
import pytest
from bundle_helpers import build
from serve_helpers import appliance_serve, copy_gguf_with, wait_health
from store_helpers import model_entry, write_model
from trust_helpers import NOW, trusted_store

from appliance.bundle.builder import BuildResult
from appliance.chunker import plan_spans
from appliance.cli.main import main
from appliance.errors import FormatError, IntegrityError, RecipeError, TruncatedError
from appliance.format.manifest import GgufInfo
from appliance.gguf_layout import read_gguf_facts, read_gguf_layout
from appliance.gguf_split import ShardName, parse_shard_name, split_identity
from appliance.importer import import_media
from appliance.serve.engine import NOT_BUILT, find_binary
from appliance.serve.model import check_file
from appliance.serve.store_resolver import store_resolver
from appliance.store import audit
from appliance.store.records import get_model
from appliance.store.store import Store

NAMES = tuple(f"tiny-{i:05d}-of-00003.gguf" for i in (1, 2, 3))
MODEL = "acme/tiny-split"
SINGLE = "acme/tiny"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    """models/ holding the tiny llama's 21 tensors as 3 shards of 8, 8 and 5."""
    models = tmp_path_factory.mktemp("split") / "models"
    models.mkdir()
    first = copy_gguf_with(tiny_gguf, models / "tiny.gguf", split_max_tensors=8)
    assert first.name == NAMES[0]
    assert sorted(p.name for p in models.iterdir()) == list(NAMES)
    return models


def recipe(base: Path, files: Sequence[tuple[str, str | None]], *,
           single: Path | None = None) -> Path:
    """A recipe for MODEL whose files are (path under base, dest or None), and SINGLE
    (``single``: the same model in one file) when given."""
    lines = ["channel: site-models", "sequence: 1", "models:", f"  - name: {MODEL}",
             "    version: f16", "    license: apache-2.0", "    files:"]
    for path, dest in files:
        lines.append(f"      - path: {path}")
        if dest is not None:
            lines.append(f"        dest: {dest}")
    if single is not None:
        lines += [f"  - name: {SINGLE}", "    version: f16", "    files:",
                  f"      - path: {single}"]
    path = base / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def built(shards: Path, tiny_gguf: Path) -> BuildResult:
    """The bundle of the split model, its shards listed out of order (2, 1, 3), and of the
    same model in one file."""
    base = shards.parent
    order = (NAMES[1], NAMES[0], NAMES[2])
    return build(base, recipe=recipe(base, [(f"models/{n}", None) for n in order],
                                     single=tiny_gguf))


@pytest.fixture(scope="module")
def media(built: BuildResult) -> Path:
    return built.out_dir


@pytest.fixture()
def store(tmp_path: Path, media: Path) -> Path:
    store_dir = trusted_store(tmp_path / "store")
    assert import_media(store_dir, [media], now=NOW).published == (f"{MODEL}:f16",
                                                                   f"{SINGLE}:f16")
    return store_dir


def shard(store_dir: Path, index: int) -> Path:
    path = get_model(store_dir, MODEL).dir / NAMES[index]
    path.chmod(0o644)  # published files are read-only
    return path


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_shards_carry_the_split_keys_and_chunk_on_their_own_tensors(shards: Path) -> None:
    layouts = [read_gguf_layout(shards / n) for n in NAMES]
    assert [(lay.split.index, lay.split.count, lay.split.tensor_count)
            for lay in layouts if lay.split] == [(0, 3, 21), (1, 3, 21), (2, 3, 21)]
    assert [len(lay.boundaries.tensors) for lay in layouts] == [8, 8, 5]
    assert layouts[0].facts is not None and layouts[0].facts.architecture == "llama"
    assert layouts[1].facts is None and layouts[2].facts is None
    with pytest.raises(FormatError, match="shard 2 of 3"):
        read_gguf_facts(shards / NAMES[1])
    for name, layout in zip(NAMES, layouts, strict=True):
        spans = plan_spans(shards / name)
        starts = {s.offset for s in spans}
        assert sum(s.length for s in spans) == (shards / name).stat().st_size
        # Cut at the shard's own header end and tensor starts (small tensors coalesce).
        assert layout.boundaries.data_start in starts
        assert starts <= set(layout.boundaries.points)


@pytest.mark.parametrize(("path", "expected"), [
    ("m-00002-of-00003.gguf", ShardName("", "m", 2, 3)),
    ("sub/dir/big-model-00001-of-00012.gguf", ShardName("sub/dir", "big-model", 1, 12)),
    ("m-00001-of-00001.gguf", None),  # one shard: llama.cpp loads it alone
    ("m-00000-of-00003.gguf", None),
    ("m-00004-of-00003.gguf", None),
    ("m-0001-of-0003.gguf", None),  # llama.cpp writes five digits
    ("m-00001-of-00003.GGUF", None),
    ("-00001-of-00003.gguf", None),
])
def test_shard_names_follow_llama_cpps_rule(path: str, expected: ShardName | None) -> None:
    assert parse_shard_name(path) == expected
    if expected is not None:
        assert expected.sibling(expected.index) == path


@pytest.mark.parametrize(("keys", "message"), [
    ({"split.no": 3, "split.count": 3, "split.tensors.count": 1}, "split.no 3 is not an index"),
    ({"split.no": 0, "split.count": 0, "split.tensors.count": 1}, "split.count 0 is not"),
    ({"split.no": 0, "split.count": 2}, "split.tensors.count None"),
])
def test_hostile_split_keys_are_refused(tmp_path: Path, keys: dict[str, int],
                                        message: str) -> None:
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    for key, value in keys.items():
        writer.add_int32(key, value)
    writer.add_tensor("t", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FormatError, match=message):
        read_gguf_layout(tmp_path / "x.gguf")


def test_llama_cpp_loads_the_first_shard_and_answers_as_the_whole_file(
        shards: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    def greedy(path: Path) -> str:
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
        text = llm.create_completion("hello", max_tokens=6, temperature=0.0)["choices"][0]
        llm.close()
        return str(text["text"])

    assert greedy(shards / NAMES[0]) == greedy(tiny_gguf)
    # Without a sibling llama.cpp cannot load the model: why the store refuses it first.
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in NAMES[:2]:
        shutil.copy(shards / name, lone / name)
    with pytest.raises(ValueError):
        llama_cpp.Llama(str(lone / NAMES[0]), n_ctx=64, verbose=False)


def test_the_bundle_records_the_whole_models_facts(built: BuildResult, tiny_gguf: Path) -> None:
    model, single = built.manifest.models
    assert model.gguf == single.gguf
    whole = read_gguf_facts(tiny_gguf)  # the same model in one file
    assert [f.path for f in model.files] == [NAMES[1], NAMES[0], NAMES[2]]
    assert model.gguf == GgufInfo(
        architecture="llama", quantization=whole.quantization,
        parameter_count=whole.parameter_count, context_length=whole.context_length,
        tensor_count=21, chat_template_hash=whole.chat_template_hash)
    assert whole.tensor_count == 21 and whole.quantization == "F16"


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "lacks 1 of its 3 shards: tiny-00003-of-00003.gguf"),
    ("renamed", "llama.cpp finds shards by name: give it dest: tiny-00002-of-00003.gguf"),
    ("elsewhere", "belong to several"),
    ("foreign", "hold 20 tensors, their split.tensors.count says 21"),
    ("impostor", "tiny-00001-of-00002.gguf is named like a shard of a split GGUF but is not"),
], ids=["missing", "renamed", "elsewhere", "foreign", "impostor"])
def test_the_builder_refuses_shards_llama_cpp_could_not_load(
        shards: Path, tiny_gguf: Path, tmp_path: Path, case: str, message: str) -> None:
    files: list[tuple[str, str | None]] = [(str(shards / n), None) for n in NAMES]
    if case == "missing":
        files.pop()
    elif case == "renamed":
        files[1] = (files[1][0], "second-part.gguf")
    elif case == "elsewhere":
        files[2] = (files[2][0], f"sub/{NAMES[2]}")
    elif case == "impostor":  # a whole model named as if it were shard 1 of 2
        files = [(str(tiny_gguf), "tiny-00001-of-00002.gguf")]
    else:  # shard 2 of another split of another model: 7 tensors where 8 were
        other = tmp_path / "other"
        other.mkdir()
        copy_gguf_with(tiny_gguf, other / "tiny.gguf", split_max_tensors=7)
        files[1] = (str(other / NAMES[1]), None)
    with pytest.raises(RecipeError, match=message):
        build(tmp_path, recipe=recipe(tmp_path, files))
    assert not (tmp_path / "media").exists()


def test_a_split_model_is_one_model_with_its_shards_side_by_side(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store", str(store), "models", "list", "--json"]) == 0
    (listed,) = [m for m in json.loads(capsys.readouterr().out) if m["name"] != SINGLE]
    assert (listed["name"], listed["verified"]) == (MODEL, True)
    assert main(["--store", str(store), "models", "show", MODEL, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    locations = [Path(f["location"]) for f in shown["files"]]
    assert len({p.parent for p in locations}) == 1  # where llama.cpp looks for the siblings
    assert sorted(p.name for p in locations) == list(NAMES)
    assert shown["gguf"]["tensor_count"] == 21 and shown["size"] == listed["size"]

    model = store_resolver(store)(MODEL)
    record = get_model(store, MODEL)
    by_name = {f.path: f for f in record.files}
    assert model.path.name == NAMES[0]  # llama.cpp is given the first shard
    assert [s.path.name for s in model.shards] == list(NAMES)
    assert model.size == sum(f.size for f in record.files) == listed["size"]
    assert model.identity == split_identity([(n, by_name[n].blake3 or "") for n in NAMES])
    assert model.identity not in {f.blake3 for f in record.files}
    assert store_resolver(store, verify="full")(MODEL) == model


def test_appliance_serve_answers_from_a_split_model(store: Path) -> None:
    with appliance_serve(store, "--model", MODEL, "--engine", "llama-cpp-python",
                         "--preload") as served:
        wait_health(served.url)
        card = httpx.get(f"{served.url}/v1/models/{MODEL}", timeout=30).json()
        assert card["identity"] == store_resolver(store)(MODEL).identity
        reply = httpx.post(f"{served.url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(("case", "where"), [
    ("deleted", NAMES[2]),
    ("truncated", NAMES[1]),
    ("metadata", NAMES[0]),  # deep in the KV section, past the first chunk
    ("tensor table", NAMES[2]),
], ids=["deleted", "truncated", "metadata", "tensor-table"])
def test_a_missing_or_changed_shard_is_refused_before_load(store: Path, case: str,
                                                           where: str) -> None:
    index = NAMES.index(where)
    path = shard(store, index)
    layout = read_gguf_layout(path)
    if case == "deleted":
        path.unlink()
    elif case == "truncated":
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size - 1)
    elif case == "metadata":
        flip_byte(path, layout.boundaries.kv_entries[-1].offset + 20)
    else:
        flip_byte(path, layout.boundaries.tensor_infos[-1].end - 1)
    with pytest.raises(IntegrityError) as refused:
        store_resolver(store)(MODEL)
    assert type(refused.value) is IntegrityError and where in str(refused.value)


def test_quick_checks_the_whole_header_of_a_single_file_too(store: Path) -> None:
    """Builder-made chunks cut the 24-byte fixed header off on its own: a quick check of only
    the first chunk would miss a changed chat template."""
    path = get_model(store, SINGLE).path
    path.chmod(0o644)
    template = next(e for e in read_gguf_layout(path).boundaries.kv_entries
                    if e.name == "tokenizer.chat_template")
    flip_byte(path, template.end - 5)
    with pytest.raises(IntegrityError, match="GGUF header differs") as refused:
        store_resolver(store, verify="quick")(SINGLE)
    assert refused.value.offset is not None and refused.value.offset >= 24  # not chunk 1


def test_quick_checks_every_shards_header_full_checks_its_tensors(store: Path) -> None:
    path = shard(store, 1)
    flip_byte(path, path.stat().st_size - 10)
    store_resolver(store, verify="quick")(MODEL)
    with pytest.raises(IntegrityError) as full:
        store_resolver(store, verify="full")(MODEL)
    assert full.value.file == f"{MODEL}:f16/{NAMES[1]}" and full.value.chunk is not None


def test_a_shard_gone_after_resolving_is_caught_just_before_load(store: Path) -> None:
    model = store_resolver(store)(MODEL)
    check_file(model)
    path = shard(store, 2)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(TruncatedError):
        check_file(model)
    path.unlink()
    with pytest.raises(IntegrityError, match="unreadable"):
        check_file(model)


def test_a_manifest_that_lacks_a_shard_is_refused(tmp_path: Path, shards: Path) -> None:
    """Made by some other builder: signed, imported, but llama.cpp could not load it."""
    contents = {n: (shards / n).read_bytes() for n in NAMES[:2]}
    with Store(tmp_path / "store") as s:
        write_model(s, model_entry("half", "1", contents), contents)
    with pytest.raises(IntegrityError, match=r"lacks tiny-00003-of-00003\.gguf"):
        store_resolver(tmp_path / "store")("half")


def test_appliance_serve_refuses_a_split_model_missing_a_shard_and_audits_it(
        store: Path) -> None:
    shard(store, 2).unlink()
    with appliance_serve(store, "--model", MODEL, "--engine", "llama-cpp-python",
                         "--preload") as served:
        deadline = time.monotonic() + 60
        while (httpx.get(f"{served.url}/health").json()["models"][MODEL]["state"]
               != "refused"):
            assert time.monotonic() < deadline, "never refused"
            time.sleep(0.05)
    (refusal,) = [r for r in audit.records(store) if r.kind == "refusal"]
    assert (refusal.details["model"], refusal.details["error"]) == (MODEL, "IntegrityError")


@pytest.mark.slow
@pytest.mark.skipif(find_binary() is None, reason=NOT_BUILT)
def test_llama_server_serves_a_split_model(store: Path) -> None:
    with appliance_serve(store, "--model", MODEL, "--engine", "llama-server",
                         "--preload") as served:
        wait_health(served.url)
        reply = httpx.post(f"{served.url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "hello", "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"]
