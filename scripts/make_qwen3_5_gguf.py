"""A Qwen3.5 GGUF written by llama.cpp's own converter, for checking our `qwen35` import.

    python scripts/make_qwen3_5_gguf.py --llama-cpp DIR [--model DIR] [--out FILE]
                                        [--outtype f32|f16|bf16|q8_0] [--tokenizer DIR]
                                        [--fuse-gate-up-exps]

DIR is a llama.cpp source tree (it holds convert_hf_to_gguf.py, conversion/ and gguf-py/;
llama-cpp-python's sdist carries one under vendor/llama.cpp). Nothing of it is copied here:
we run it as a user would, on a copy of the model folder.

The model folder needs a tokenizer for the converter. The committed tiny fixture
(tests/fixtures/qwen3_5_text, vocabulary 256) has none, so one is made for it (and for any
folder without one whose vocabulary is larger, which the converter pads): byte-level
BPE (GPT-2's byte alphabet) with Qwen2's pre-tokenizer, whose tokens 0..254 are the bytes
0x00..0xFE and token 255 the one merge " t" (llama.cpp requires a merges list; the fixture's
vocabulary has room for 256 tokens, so byte 0xFF is left out). The converter recognises a BPE
pre-tokenizer by hashing its output on a fixed text; ours hashes to no known model, so for
that case the script tells the converter the pre-tokenizer is "qwen2" (it is: same split
regex). A real vocabulary
(`--tokenizer DIR` with a tokenizer.json, or `--tokenizer qwen2.5`: the Qwen2.5 tokenizer
rebuilt from the catalog's qwen2.5-coder-0.5b GGUF, which the converter pads to the 0.8B
checkpoint's 248320 entries) is left to the converter's own detection.
bench/qwen3_5_gguf.py uses the same functions for the bench's F16 / Q8_0 files.

Default output: tests/fixtures/qwen3_5_text/llama_cpp_f32.gguf, the fixture
tests/test_gguf_qwen3_5.py compares with the safetensors load of the same weights. The
Qwen3.5-MoE fixtures (tests/test_gguf_qwen3_5_moe.py) are

    python scripts/make_qwen3_5_gguf.py --llama-cpp DIR --model tests/fixtures/qwen3_5_moe
    python scripts/make_qwen3_5_gguf.py --llama-cpp DIR --model tests/fixtures/qwen3_5_moe \
        --outtype q8_0 --fuse-gate-up-exps \
        --out tests/fixtures/qwen3_5_moe/llama_cpp_q8_0_fused.gguf
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # lattice_engine from this checkout when run as a script
FIXTURE = ROOT / "tests" / "fixtures" / "qwen3_5_text"


def byte_level_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json of a 256-token byte-level BPE: token i = byte i
    for i < 255, token 255 = the merge of " " and "t"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    def bytes_to_unicode() -> dict[int, str]:
        # GPT-2's printable stand-ins for the 256 bytes
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        chars, extra = {}, 0
        for b in range(256):
            if b in keep:
                chars[b] = chr(b)
            else:
                chars[b] = chr(256 + extra)
                extra += 1
        return chars

    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(255)}
    merge = (chars[ord(" ")], chars[ord("t")])
    vocab[merge[0] + merge[1]] = 255
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[merge]))
    # Qwen2's split, then the byte-level mapping (as Qwen2's tokenizer.json has them)
    split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}))


def qwen25_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json of Qwen2.5 (from the catalog's GGUF), a
    pre-tokenizer the converter knows. Speed and logits do not depend on the tokenizer."""
    from lattice_engine.io.catalog import resolve
    from lattice_engine.io.gguf_reader import load_gguf
    tok = load_gguf(resolve("qwen2.5-coder-0.5b"))
    tok.tokenizer.save(str(folder / "tokenizer.json"))
    config = {k: v for k, v in tok.tokenizer_config.items() if k != "chat_template"}
    config["tokenizer_class"] = "Qwen2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def has_mtp(model: Path) -> bool:
    """Whether the checkpoint carries a multi-token-prediction head (tensors `mtp.*`)."""
    from safetensors import safe_open
    for f in model.glob("*.safetensors"):
        if f.name.startswith(("golden", "reference")):
            continue
        with safe_open(str(f), "np") as st:
            if any(k.startswith(("mtp.", "model.mtp.")) for k in st.keys()):
                return True
    return False


def convert(llama_cpp: Path, model: Path, out: Path, outtype: str,
            tokenizer: str | None = None, fuse_gate_up: bool = False) -> None:
    """Run llama.cpp's converter on `model` (an HF folder) into `out`, in a subprocess (the
    converter imports its own gguf package); `tokenizer` as --tokenizer below."""
    converter = llama_cpp / "convert_hf_to_gguf.py"
    if not converter.is_file():
        sys.exit(f"{converter} does not exist; pass the root of a llama.cpp source tree")
    cmd = [sys.executable, __file__, "--llama-cpp", str(llama_cpp), "--model", str(model),
           "--out", str(out), "--outtype", outtype, "--in-process"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    if fuse_gate_up:
        cmd.append("--fuse-gate-up-exps")
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree")
    ap.add_argument("--model", type=Path, default=FIXTURE, help="HF folder of a Qwen3.5 model")
    ap.add_argument("--tokenizer", default=None,
                    help="a folder with tokenizer.json, or 'qwen2.5' (default: the model's, or "
                         "a byte-level one for a 256-token vocabulary)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--fuse-gate-up-exps", action="store_true",
                    help="MoE: the converter's one [E, 2I, H] tensor per layer for gate and up")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.out or args.model / f"llama_cpp_{args.outtype}.gguf"
    if not args.in_process:
        convert(args.llama_cpp, args.model, out, args.outtype, args.tokenizer,
                args.fuse_gate_up_exps)
        print(f"wrote {out} ({out.stat().st_size} bytes)")
        return
    converter = args.llama_cpp / "convert_hf_to_gguf.py"
    # the converter's own gguf package, before anything imports an installed one
    sys.path[:0] = [str(args.llama_cpp / "gguf-py"), str(args.llama_cpp)]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        for f in args.model.iterdir():
            if f.suffix in (".json", ".safetensors") and not f.name.startswith("golden") \
                    and not f.name.startswith("reference"):
                (folder / f.name).symlink_to(f.resolve())
        toy = False
        if args.tokenizer == "qwen2.5":
            qwen25_tokenizer(folder)
        elif args.tokenizer is not None:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(args.tokenizer) / name).is_file():
                    shutil.copy(Path(args.tokenizer) / name, folder / name)
        elif not (folder / "tokenizer.json").exists():
            raw = json.loads((args.model / "config.json").read_text())
            vocab = raw.get("vocab_size") or (raw.get("text_config") or {}).get("vocab_size")
            if not isinstance(vocab, int) or vocab < 256:
                sys.exit(f"{args.model} has no tokenizer.json and a vocabulary of {vocab}, "
                         f"under 256; pass --tokenizer DIR with a tokenizer.json")
            # the converter pads a smaller tokenizer with [PAD<i>] tokens up to the
            # vocabulary: fine for random-weight bench models
            byte_level_tokenizer(folder)
            toy = True

        sys.argv = [str(converter), str(folder), "--outfile", str(out), "--outtype", args.outtype]
        if args.fuse_gate_up_exps:
            sys.argv.append("--fuse-gate-up-exps")
        if not has_mtp(args.model):
            # the converter counts MTP layers from the checkpoint and stops when it has none
            sys.argv.append("--no-mtp")
        import convert_hf_to_gguf  # noqa: E402  (the converter, from the given tree)
        if toy:
            from conversion.base import TextModel
            TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
            # transformers picks a tokenizer class by model_type before tokenizer_config's
            # (Qwen3.5-MoE's adds <|endoftext|> past the 256 tokens): give the converter
            # exactly the toy tokenizer.json
            import transformers
            toy_file = str(folder / "tokenizer.json")
            transformers.AutoTokenizer.from_pretrained = staticmethod(
                lambda *a, **k: transformers.PreTrainedTokenizerFast(tokenizer_file=toy_file))
        convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
