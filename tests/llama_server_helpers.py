"""Test models for the llama-server engine's grammar tests.

llama-server feeds the chat template's generation prompt (``<|im_start|>assistant\\n``) through
an output-format grammar before sampling, comparing token pieces with the prompt's text. The
tiny llama's SentencePiece vocabulary adds a space prefix after a special token (`` a`` for
``a``), which that check refuses ("Failed to initialize samplers"); real vocabularies (gemma's)
pass. ``grammar_ready_tiny`` is the tiny llama with ``tokenizer.ggml.add_space_prefix`` false.
"""

from __future__ import annotations

from pathlib import Path

from serve_helpers import copy_gguf_with


def grammar_ready_tiny(src: Path, dst: Path) -> Path:
    return copy_gguf_with(src, dst, extra_bool={"tokenizer.ggml.add_space_prefix": False})
