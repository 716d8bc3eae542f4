"""Split GGUF on the real model: gemma3-270m as one file and as gguf-split shards, side by side.

``python -m bench.split_serve [--shards 3]`` splits the embedded default model with gguf-py's
split writer (what llama.cpp's gguf-split writes), builds one bundle holding both forms,
imports it into a scratch store and prints, for each form: the store's verify-before-load
time (``--verify-on-load quick`` and ``full``), llama.cpp's load time, and whether greedy
generation gives the same text. Scratch files live in a temporary directory (TMPDIR).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import gguf
import llama_cpp

from appliance.bundle.builder import build_bundle
from appliance.default_model import default_model_path
from appliance.importer import import_media
from appliance.serve.store_resolver import store_resolver
from bench.signed_bundle import installed_signer


def split(src: Path, dst: Path, shards: int) -> list[Path]:
    """``src`` rewritten as ``shards`` files of about equal tensor counts."""
    reader = gguf.GGUFReader(src)
    per = -(-len(reader.tensors) // shards)
    writer = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()),
                             split_max_tensors=per)
    for kv in reader.fields.values():
        if kv.name.startswith("GGUF.") or kv.name == "general.architecture":
            continue
        kind = kv.types[0]
        sub_type = kv.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(kv.name, kv.contents(), kind, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape,
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(dst)


def best(seconds: list[float]) -> str:
    return f"{min(seconds) * 1000:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args(argv)
    src = default_model_path()
    with tempfile.TemporaryDirectory(prefix="appliance-split-") as scratch:
        base = Path(scratch)
        (base / "models").mkdir()
        shards = split(src, base / "models" / "gemma.gguf", args.shards)
        (base / "models" / src.name).symlink_to(src)
        lines = ["channel: bench", "sequence: 1", "models:",
                 f"  - {{name: single, version: q4, files: [{{path: models/{src.name}}}]}}",
                 "  - name: split", "    version: q4", "    files:"]
        lines += [f"      - path: models/{p.name}" for p in shards]
        recipe = base / "recipe.yaml"
        recipe.write_text("\n".join(lines) + "\n")
        now = datetime.now(UTC)
        store = base / "store"
        key, root = installed_signer(base, store, now)
        started = time.perf_counter()
        build_bundle(recipe, [key], base / "media", trust_chain=[root], now=now)
        import_media(store, [base / "media"], now=now)
        print(f"gemma3-270m split into {len(shards)} shards "
              f"({', '.join(str(p.stat().st_size) for p in shards)} bytes); build+import "
              f"{time.perf_counter() - started:.1f} s")
        texts = {}
        for name in ("single", "split"):
            timings: dict[str, list[float]] = {"quick": [], "full": [], "load": []}
            for _ in range(3):
                for mode in ("quick", "full"):
                    t = time.perf_counter()
                    model = store_resolver(store, verify=mode)(name)
                    timings[mode].append(time.perf_counter() - t)
                t = time.perf_counter()
                llm = llama_cpp.Llama(str(model.path), n_ctx=256, n_threads=2, verbose=False)
                timings["load"].append(time.perf_counter() - t)
            out = llm.create_completion("The capital of France is", max_tokens=16,
                                        temperature=0.0)
            texts[name] = out["choices"][0]["text"]  # type: ignore[index]
            llm.close()
            print(f"{name:6} files={len(model.files)} verify quick {best(timings['quick'])}, "
                  f"full {best(timings['full'])}, llama.cpp load {best(timings['load'])} "
                  f"(best of 3)")
        same = texts["single"] == texts["split"]
        print(f"greedy 16 tokens identical: {same}: {texts['split']!r}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
