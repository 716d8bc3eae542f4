"""The GGUF fixtures are what they claim: the tiny model runs, the big one parses."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_fixtures import (
    DEFAULT_TEMPLATE,
    MANY_TENSOR_ARRAY_LEN,
    many_tensor_names,
    write_many_tensor_gguf,
    write_tiny_llama,
)

from appliance import tiny_model


def _field_str(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def test_tiny_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=3).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=3).read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", seed=4).read_bytes()
    assert a == b
    assert a != c
    assert len(a) == len(c)  # only the weights differ


def test_tiny_metadata_and_vocab(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)
    assert _field_str(reader, "general.architecture") == "llama"
    assert _field_str(reader, "tokenizer.ggml.model") == "llama"
    assert _field_str(reader, "tokenizer.chat_template") == DEFAULT_TEMPLATE
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == tiny_model.vocab_size()
    texts = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert all(f"<0x{b:02X}>" in texts for b in range(256))
    types = reader.fields["tokenizer.ggml.token_type"]
    type_values = [int(types.parts[i][0]) for i in types.data]
    assert type_values.count(int(gguf.TokenType.BYTE)) == 256
    assert len(reader.tensors) == 3 + 9 * tiny_model.N_LAYER


def test_tiny_without_template(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "t.gguf", chat_template=None))
    assert "tokenizer.chat_template" not in reader.fields


def test_tiny_generates_tokens(tiny_gguf: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    start = time.monotonic()
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, seed=0, verbose=False)
    prompt_tokens = llm.tokenize(b"hello world")
    assert prompt_tokens[0] == tiny_model.BOS_ID
    eos = llm.token_eos()

    def ban_eos(_ids: object, scores: np.ndarray) -> np.ndarray:
        scores[eos] = -np.inf
        return scores

    out = llm.create_completion(
        "hello world",
        max_tokens=16,
        temperature=0.0,
        logits_processor=llama_cpp.LogitsProcessorList([ban_eos]),
    )
    assert out["usage"]["completion_tokens"] == 16
    assert time.monotonic() - start < 5.0  # "well under a second" on an idle core


def test_tiny_chat_completion_uses_template(tiny_gguf: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, seed=0, verbose=False)
    # The template wraps each message in <|im_start|>...<|im_end|>; those are single tokens.
    im_start = llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0.0, seed=0
    )
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    # Prompt = bos + im_start + "user\nhi" + im_end + "\n" + im_start + "assistant\n".
    assert out["usage"]["prompt_tokens"] > 6
    assert out["usage"]["completion_tokens"] >= 1


def test_many_tensor_parses(many_tensor_gguf: Path) -> None:
    reader = gguf.GGUFReader(many_tensor_gguf)
    assert [t.name for t in reader.tensors] == many_tensor_names(200)
    sizes = [int(t.n_bytes) for t in reader.tensors]
    assert min(sizes) < 64
    assert max(sizes) > 2 << 20
    assert 20e6 < sum(sizes) < 80e6
    types = {t.tensor_type for t in reader.tensors}
    assert {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16} <= types
    assert len(reader.fields["test.strings"].data) == MANY_TENSOR_ARRAY_LEN
    # The header (KV + tensor table) is big, like a real vocab's.
    assert min(int(t.data_offset) for t in reader.tensors) > 300_000


def test_many_tensor_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    a = write_many_tensor_gguf(tmp_path / "a.gguf", seed=1, n_tensors=40)
    elapsed = time.monotonic() - start
    b = write_many_tensor_gguf(tmp_path / "b.gguf", seed=1, n_tensors=40)
    assert a.read_bytes() == b.read_bytes()
    assert len(gguf.GGUFReader(a).tensors) == 40
    assert elapsed < 10.0
