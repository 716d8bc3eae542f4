"""Quantize at build: a tiny F32 model becomes Q8_0 / Q4_K_M through llama.cpp's own quantizer,
is packed, signed with its provenance, imported, and loads and generates in llama.cpp."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from bundle_helpers import build
from trust_helpers import NOW, trusted_store

from appliance.bundle import quantize
from appliance.bundle.quantize import quantize_gguf, quantized_dest, read_imatrix
from appliance.bundle.recipe import parse_recipe
from appliance.errors import DiskFullError, QuantizeError, RecipeError
from appliance.gguf_layout import read_gguf_layout
from appliance.importer import import_media
from appliance.store.records import get_model
from appliance.tiny_model import N_LAYER, write_tiny_llama

WIDE = {"n_embd": 256, "n_ff": 512}  # K-quants work on rows of 256 (QK_K)
N_MATRICES = 2 + 7 * N_LAYER  # token_embd, output and seven per layer


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("quant") / "wide-f32.gguf", float32=True,
                            **WIDE)


def _recipe(base: Path, source: Path, extra: str) -> Path:
    models = base / "models"
    models.mkdir(exist_ok=True)
    (models / source.name).write_bytes(source.read_bytes())
    recipe = base / "recipe.yaml"
    recipe.write_text(
        "channel: site-models\nsequence: 1\nmodels:\n  - name: acme/wide\n    version: q\n"
        f"    files:\n      - path: models/{source.name}\n{extra}")
    return recipe


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate(path: Path, tokens: int = 12) -> list[int]:
    """The tokens llama.cpp samples after "hello world" (greedy, end of text banned)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, seed=0, verbose=False)
    eos = llm.token_eos()
    sampled: list[int] = []
    for token in llm.generate(llm.tokenize(b"hello world"), temp=0.0,
                              logits_processor=llama_cpp.LogitsProcessorList(
                                  [lambda _ids, scores: _ban(scores, eos)])):
        sampled.append(token)
        if len(sampled) == tokens:
            break
    return sampled


def _ban(scores: np.ndarray, token: int) -> np.ndarray:
    scores[token] = -np.inf
    return scores


@pytest.mark.parametrize(("target", "types"), [
    ("Q8_0", {"Q8_0": N_MATRICES, "F32": 1 + 2 * N_LAYER}),
    # Q4_K_M is llama.cpp's mix: Q6_K for output.weight and some attn_v/ffn_down, Q4_K else.
    ("Q4_K_M", {"Q4_K", "Q6_K", "F32"}),
])
def test_quantized_at_build_imports_loads_and_generates(
        tmp_path: Path, wide_f32: Path, target: str, types: dict[str, int] | set[str]) -> None:
    recipe = _recipe(tmp_path, wide_f32, f"        quantize: {target.lower()}\n")
    result = build(tmp_path, recipe=recipe)
    (model,) = result.manifest.models
    (entry,) = model.files
    assert entry.path == f"wide-{target}.gguf"
    assert model.gguf is not None and model.gguf.quantization == target
    (source,) = model.provenance.sources
    assert source.source == (f"quantize:{target} source_type=F32 "
                             f"source_sha256={_sha256(wide_f32)} of path:models/wide-f32.gguf")
    store = trusted_store(tmp_path / "store")
    assert import_media(store, [tmp_path / "media"], now=NOW).complete
    (stored,) = get_model(store, "acme/wide").files
    assert source.sha256 == _sha256(stored.location)  # the sha256 signed is the packed file's
    tensors = read_gguf_layout(stored.location).boundaries.tensors
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    assert counts == types if isinstance(types, dict) else set(counts) == types
    assert stored.location.stat().st_size < wide_f32.stat().st_size / 3
    assert len(_generate(stored.location)) == 12


def test_narrow_rows_fall_back_as_llama_cpp_does(tmp_path: Path, tiny_gguf: Path) -> None:
    """The 64-wide tiny model cannot hold K-quant blocks of 256: llama.cpp puts each such
    tensor in its fallback type (Q4_K -> Q5_0, Q6_K -> Q8_0) and says how many; we report it."""
    done = quantize_gguf(tiny_gguf, "Q4_K_M", tmp_path / "scratch")
    assert done.source_type == "F16"
    assert not {t for t in done.tensor_types if t.endswith("_K")}
    assert set(done.tensor_types) == {"Q5_0", "Q8_0", "F32"}
    assert 0 < done.fallbacks <= N_MATRICES
    assert len(_generate(done.path)) == 12


def test_progress_counts_every_tensor(tmp_path: Path, wide_f32: Path) -> None:
    seen: list[tuple[int, int]] = []
    done = quantize_gguf(wide_f32, "Q8_0", tmp_path, progress=lambda i, n: seen.append((i, n)))
    n = len(read_gguf_layout(wide_f32).boundaries.tensors)
    assert seen == [(i, n) for i in range(1, n + 1)]
    assert done.path == tmp_path / "wide-Q8_0.gguf" and sorted(tmp_path.iterdir()) == [done.path]


def test_an_already_quantized_source_is_refused(tmp_path: Path, wide_f32: Path) -> None:
    q8 = quantize_gguf(wide_f32, "Q8_0", tmp_path / "first").path
    with pytest.raises(QuantizeError, match=r"already quantized \(Q8_0; tensor .* is Q8_0\)"):
        quantize_gguf(q8, "Q4_K_M", tmp_path / "second")
    recipe = _recipe(tmp_path, q8, "        quantize: Q4_K_M\n")
    with pytest.raises(QuantizeError, match="already quantized"):
        build(tmp_path, recipe=recipe)
    assert not (tmp_path / "media").exists()


def test_a_type_that_needs_an_imatrix_is_refused_before_writing(tmp_path: Path,
                                                                wide_f32: Path) -> None:
    with pytest.raises(QuantizeError, match="needs an importance matrix"):
        quantize_gguf(wide_f32, "IQ2_XXS", tmp_path)
    assert list(tmp_path.iterdir()) == []  # llama.cpp's dry run wrote nothing


def test_too_little_scratch_space_is_disk_full(tmp_path: Path, wide_f32: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize, "FREE_SPACE_MARGIN", 1 << 60)  # more than any disk has
    with pytest.raises(DiskFullError, match=r"needs about .* MiB free in"):
        quantize_gguf(wide_f32, "Q8_0", tmp_path)
    assert list(tmp_path.iterdir()) == []


def _write_imatrix(path: Path, model: Path) -> Path:
    """An importance matrix in llama-imatrix's GGUF form for every weight matrix of model."""
    reader = gguf.GGUFReader(str(model))
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_array("imatrix.datasets", ["tiny-calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 64)
    rng = np.random.default_rng(7)
    for tensor in reader.tensors:
        if len(tensor.shape) >= 2:
            columns = int(tensor.shape[0])
            writer.add_tensor(f"{tensor.name}.in_sum2",
                              rng.random(columns, dtype=np.float32) * 256 * 4)
            writer.add_tensor(f"{tensor.name}.counts", np.array([256.0], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_imatrix_reaches_llama_cpp_and_is_signed(tmp_path: Path, wide_f32: Path) -> None:
    matrix_path = _write_imatrix(tmp_path / "imatrix.gguf", wide_f32)
    matrix = read_imatrix(matrix_path)
    assert len(matrix.entries) == N_MATRICES and matrix.datasets == ("tiny-calibration.txt",)
    assert all(np.allclose(v.mean(), 2.0, atol=0.2) for v in matrix.entries.values())  # /256
    plain = quantize_gguf(wide_f32, "Q4_K_M", tmp_path / "plain")
    weighted = quantize_gguf(wide_f32, "Q4_K_M", tmp_path / "weighted", imatrix=matrix_path)
    assert weighted.imatrix_sha256 == _sha256(matrix_path)
    assert weighted.path.read_bytes() != plain.path.read_bytes()  # the weights steered rounding
    fields = gguf.GGUFReader(str(weighted.path)).fields
    assert fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert fields["quantize.imatrix.entries_count"].contents() == N_MATRICES
    recipe = _recipe(tmp_path, wide_f32,
                     "        quantize: Q4_K_M\n        imatrix: imatrix.gguf\n")
    (model,) = build(tmp_path, recipe=recipe).manifest.models
    assert re.search(f" imatrix_sha256={_sha256(matrix_path)} of path:",
                     model.provenance.sources[0].source)


def test_a_legacy_imatrix_is_refused_with_the_conversion(tmp_path: Path) -> None:
    legacy = tmp_path / "imatrix.dat"
    legacy.write_bytes(b"\x01\x00\x00\x00" + b"\x00" * 32)
    with pytest.raises(QuantizeError, match=r"llama-imatrix --in-file imatrix\.dat"):
        read_imatrix(legacy)


@pytest.mark.parametrize(("extra", "message"), [
    ("        quantize: Q4_K_X\n", "not a llama.cpp quantization type"),
    ("        quantize: 4\n", "not a llama.cpp quantization type"),
    ("        imatrix: m.gguf\n", "imatrix: needs quantize:"),
    ("        quantize: Q8_0\n        imatrix: ''\n", "imatrix must be a file path"),
])
def test_bad_quantize_fields_are_recipe_errors(tmp_path: Path, extra: str, message: str) -> None:
    text = ("channel: c\nsequence: 1\nmodels:\n  - name: m\n    version: v\n    files:\n"
            f"      - path: m-f16.gguf\n{extra}")
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text.encode(), tmp_path)


def test_quantized_names() -> None:
    assert quantized_dest("model-F16.gguf", "Q4_K_M") == "model-Q4_K_M.gguf"
    assert quantized_dest("sub/llama.bf16.gguf", "Q8_0") == "sub/llama.Q8_0.gguf"
    assert quantized_dest("weights.gguf", "Q5_K_M") == "weights-Q5_K_M.gguf"
    spec = parse_recipe(b"channel: c\nsequence: 1\nmodels:\n  - name: m\n    version: v\n"
                        b"    files:\n      - path: x-f32.gguf\n        quantize: q6_k\n",
                        Path("/r")).models[0].files[0]
    assert (spec.quantize, spec.dest) == ("Q6_K", "x-Q6_K.gguf")


def test_cli_build_says_when_it_quantizes_and_leaves_no_scratch(
        tmp_path: Path, wide_f32: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from appliance.cli.main import main
    from appliance.errors import EXIT_ERROR, EXIT_OK

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))  # what TMPDIR would set
    assert main(["keys", "generate", "pub", "--out", str(tmp_path / "keys"),
                 "--unencrypted"]) == EXIT_OK
    recipe = _recipe(tmp_path, wide_f32, "        quantize: Q8_0\n")
    argv = ["bundle", "build", str(recipe), "--key", str(tmp_path / "keys" / "pub.key")]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "media")]) == EXIT_OK
    err = capsys.readouterr().err
    assert "quantizing wide-f32.gguf (6 MB) to Q8_0 with llama.cpp in " in err
    assert "quantized wide-f32.gguf from F32 to Q8_0: 2 MB in " in err
    assert list(scratch_root.iterdir()) == []  # the quantized file went with the build
    q8 = quantize_gguf(wide_f32, "Q8_0", tmp_path / "q8").path
    recipe = _recipe(tmp_path, q8, "        quantize: Q4_K_M\n")
    assert main([*argv, "--out", str(tmp_path / "media2")]) == EXIT_ERROR
    assert "already quantized" in capsys.readouterr().err
    assert list(scratch_root.iterdir()) == [] and not (tmp_path / "media2").exists()
