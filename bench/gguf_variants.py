"""Make the float32 GGUF of a model and llama.cpp's own quantizations of it, for benches.

    python bench/gguf_variants.py smollm2-135m --types f32 f16 q8_0

The catalog models are quantized at the source (Q4_1, Q4_K_M). Dequantized to float32 they
are the "original" weights every engine starts from: this writes that F32 GGUF (same
metadata, same tensor layout) and then asks llama.cpp (`llama_model_quantize`) for the
F16 / Q8_0 / Q4_0 / Q4_1 variants, so lattice and llama.cpp can load the very same files.
Outputs go to $LATTICE_HOME/bench/<model>/<type>.gguf and are reused when present.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from lattice_engine.io.catalog import lattice_home, resolve

LLAMA_FTYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}


def write_f32(source: Path, dest: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    tmp = dest.with_suffix(".part")
    writer = GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(0)  # ALL_F32
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        writer.add_tensor(t.name, w.reshape(shape), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dest)


def quantize_with_llama_cpp(f32: Path, dest: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[kind]
    params.nthread = 2
    tmp = dest.with_suffix(".part")
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) failed with {rc}")
    os.replace(tmp, dest)


def variant(model: str, kind: str) -> Path:
    """Path of `model` as a `kind` GGUF (f32, f16, q8_0, q4_0, q4_1), made on first use."""
    folder = lattice_home() / "bench" / model
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "f32.gguf"
    if not f32.exists():
        print(f"writing {f32} (dequantized from the catalog file)", file=sys.stderr)
        write_f32(resolve(model), f32)
    if kind == "f32":
        return f32
    dest = folder / f"{kind}.gguf"
    if not dest.exists():
        print(f"quantizing {dest} with llama.cpp", file=sys.stderr)
        quantize_with_llama_cpp(f32, dest, kind)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    args = parser.parse_args()
    for kind in args.types:
        print(variant(args.model, kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
