"""llama.cpp's GGUF files (F16, Q8_0) of the random 0.8B Qwen3.5 checkpoint, for bench/qwen3_5.py.

    pip install scikit-build-core   # --no-build-isolation reads the metadata with it
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: --no-build-isolation -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp
    python bench/qwen3_5_gguf.py --llama-cpp /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp

The converter (`convert_hf_to_gguf.py` of that source tree, which registers
Qwen3_5ForConditionalGeneration) runs through scripts/make_qwen3_5_gguf.py, which gives the
random checkpoint (it has no tokenizer) the Qwen2.5 tokenizer rebuilt from the catalog's
qwen2.5-coder-0.5b GGUF. Speed does not depend on the tokenizer. F16 comes from the converter (`--outtype f16`),
Q8_0, Q4_0 and Q4_1 from llama.cpp's own quantizer (`llama_model_quantize`) applied to the F16
file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from qwen3_5 import default_model  # noqa: E402

sys.path.insert(0, str(HERE.parent / "scripts"))
from make_qwen3_5_gguf import convert  # noqa: E402  (the converter run, shared with the fixtures)


def quantize(source: Path, target: Path, ftype: str) -> None:
    """llama.cpp's own quantizer with its default choices (e.g. which tensors get more bits)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    tmp = target.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) of {source} failed with {rc}")
    os.replace(tmp, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--llama-cpp", type=Path, required=True,
                        help="llama.cpp source tree holding convert_hf_to_gguf.py")
    args = parser.parse_args()
    f16 = args.model / "f16.gguf"
    if not f16.exists():
        convert(args.llama_cpp, args.model, f16, "f16", tokenizer="qwen2.5")
    made = [f16]
    for name, ftype in (("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"),
                        ("q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1")):
        target = args.model / f"{name}.gguf"
        if not target.exists():
            quantize(f16, target, ftype)
        made.append(target)
    print(*made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
