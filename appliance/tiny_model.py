"""A tiny, runnable llama-architecture GGUF made from seeded random weights.

One implementation shared by ``appliance doctor`` (which must prove llama.cpp loads and
generates on this host without shipping a real model) and the test fixtures. The model is
nonsense by design: two layers, a byte-level SentencePiece vocabulary (every byte reachable
through ``<0xNN>`` fallback tokens) and a ChatML-like chat template. The same seed always
gives the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

# ChatML-like: enough for llama-cpp-python's Jinja chat formatter to build a prompt.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX = 256
ARCH = "llama"
MODEL_NAME = "tiny-llama-test"

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
# A few multi-character pieces so the SentencePiece merge path is exercised too.
_PIECES = ("▁", "▁the", "▁a", "he", "ll", "lo", "▁hello", "▁world", "or", "ld", "in", "er")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types (gguf.TokenType) of the tiny byte-level vocab."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i, text in enumerate(_SPECIAL):
        tokens.append(text)
        scores.append(0.0)
        types.append(int(gguf.TokenType.UNKNOWN if i == UNK_ID else gguf.TokenType.CONTROL))
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        scores.append(0.0)
        types.append(int(gguf.TokenType.BYTE))
    # Printable ASCII as single-character pieces, then the longer pieces; longer pieces score
    # higher so SentencePiece prefers merging into them.
    singles = [chr(c) for c in range(0x21, 0x7F)]
    for text in singles:
        tokens.append(text)
        scores.append(-10.0)
        types.append(int(gguf.TokenType.NORMAL))
    for rank, text in enumerate(_PIECES):
        tokens.append(text)
        scores.append(-1.0 - rank * 0.01)
        types.append(int(gguf.TokenType.NORMAL))
    return tokens, scores, types


def vocab_size() -> int:
    """Number of tokens in the tiny vocabulary."""
    return len(_SPECIAL) + 256 + (0x7F - 0x21) + len(_PIECES)


def _tensors(rng: np.random.Generator, n_vocab: int, n_embd: int = N_EMBD, n_ff: int = N_FF,
             dtype: type[np.floating] = np.float16) -> list[tuple[str, np.ndarray]]:
    """Weights in llama.cpp's tensor naming; numpy shapes are (rows, cols) = GGUF reversed."""

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(dtype)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    head_dim = n_embd // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV
    out: list[tuple[str, np.ndarray]] = [("token_embd.weight", matrix(n_vocab, n_embd))]
    for layer in range(N_LAYER):
        blk = f"blk.{layer}"
        out += [
            (f"{blk}.attn_norm.weight", norm()),
            (f"{blk}.attn_q.weight", matrix(n_embd, n_embd)),
            (f"{blk}.attn_k.weight", matrix(n_embd_kv, n_embd)),
            (f"{blk}.attn_v.weight", matrix(n_embd_kv, n_embd)),
            (f"{blk}.attn_output.weight", matrix(n_embd, n_embd)),
            (f"{blk}.ffn_norm.weight", norm()),
            (f"{blk}.ffn_gate.weight", matrix(n_ff, n_embd)),
            (f"{blk}.ffn_up.weight", matrix(n_ff, n_embd)),
            (f"{blk}.ffn_down.weight", matrix(n_embd, n_ff)),
        ]
    out += [("output_norm.weight", norm()), ("output.weight", matrix(n_vocab, n_embd))]
    return out


def write_tiny_llama(
    path: Path, *, seed: int = 0, chat_template: str | None = DEFAULT_TEMPLATE,
    n_embd: int = N_EMBD, n_ff: int = N_FF, float32: bool = False,
) -> Path:
    """Write the tiny llama GGUF to ``path`` (replacing it atomically) and return ``path``.

    ``chat_template=None`` leaves ``tokenizer.chat_template`` out, for tests of models
    without one. The file is about 100 KiB and loads in llama.cpp in milliseconds.
    ``n_embd``/``n_ff`` widen it (llama.cpp's K-quants need rows of 256) and ``float32``
    writes F32 weights (an ALL_F32 file, a source to quantize) instead of F16.
    """
    path = Path(path)
    tokens, scores, types = _vocab()
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        writer.add_name(MODEL_NAME)
        file_type = gguf.LlamaFileType.ALL_F32 if float32 else gguf.LlamaFileType.MOSTLY_F16
        writer.add_file_type(int(file_type))
        writer.add_context_length(N_CTX)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(n_embd // N_HEAD)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_unk_token_id(UNK_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        dtype = np.float32 if float32 else np.float16
        for name, array in _tensors(rng, len(tokens), n_embd, n_ff, dtype):
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path
