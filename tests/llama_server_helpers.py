"""Test models for the llama-server engine's grammar tests.

llama-server feeds the chat template's generation prompt (``<|im_start|>assistant\\n``) through
an output-format grammar before sampling, comparing token pieces with the prompt's text. The
tiny llama's SentencePiece vocabulary adds a space prefix after a special token (`` a`` for
``a``), which that check refuses ("Failed to initialize samplers"); real vocabularies (gemma's)
pass. ``grammar_ready_tiny`` is the tiny llama with ``tokenizer.ggml.add_space_prefix`` false.
"""

from __future__ import annotations

from pathlib import Path

import gguf


def grammar_ready_tiny(src: Path, dst: Path) -> Path:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for kv in reader.fields.values():
        if kv.name.startswith("GGUF.") or kv.name == "general.architecture":
            continue
        kind = kv.types[0]
        sub_type = kv.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(kv.name, kv.contents(), kind, sub_type=sub_type)
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape,
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
