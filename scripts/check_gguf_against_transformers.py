"""Check lattice's GGUF import against transformers' own GGUF loading, by hand.

For each model (catalog name or .gguf path):
1. tensors: every tensor of `load_gguf` (float32) against
   `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`'s state dict
   (transformers dequantizes with the same `gguf` package and un-permutes llama's q/k);
   also the packed path (every ggml type passed through as bytes, then dequantized)
   against the float path, which checks the row un-permutation of packed llama q/k.
2. tokenizer: token ids of the whole WikiText-2 test text and of chat-formatted strings
   with special tokens, from lattice's rebuilt tokenizer, from
   `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, and from a small pure-Python BPE
   written here to llama.cpp's conventions (its pre-tokenizer regexes as llama-vocab.cpp
   spells them, special tokens split out first, lowest-rank-leftmost merges); plus the
   decode round trip.

Needs torch + transformers. Prints human-readable lines, then one JSON object last.

    python scripts/check_gguf_against_transformers.py [MODEL ...] [--text FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lattice_engine.io.catalog import resolve  # noqa: E402
from lattice_engine.io.gguf_reader import load_gguf  # noqa: E402
from lattice_engine.io.gguf_tokenizer import byte_alphabet  # noqa: E402

# llama.cpp's pre-tokenizer regexes, spelled as llama-vocab.cpp spells them.
LLAMACPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMACPP_REGEXES = {
    "smollm": [r"\p{N}", LLAMACPP_GPT2],
    "gpt2": [LLAMACPP_GPT2],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is 12345 * 678? Answer in Français, s'il vous plaît."},
     {"role": "assistant", "content": "12345 × 678 = 8,369,910.\n\nVoilà!"}],
    [{"role": "user", "content": "def f(x):\n    return x**2  # 中文 emoji 🙂\n\n\tTabs\r\n"}],
]
EXTRA_STRINGS = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                 "<|endoftext|><|endoftext|>x<|im_end|>  <tool_call>{}</tool_call>",
                 "I'M HERE, you'LL see 2024-01-02   \n\n\n  end  "]


class LlamaCppStyleBPE:
    """A deliberately simple byte-level BPE following llama.cpp's tokenize(parse_special=true)."""

    def __init__(self, meta: dict):
        import regex
        self.regexes = [regex.compile(r) for r in LLAMACPP_REGEXES[meta["tokenizer.ggml.pre"]]]
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        self.vocab = {}
        for i, t in enumerate(tokens):
            self.vocab.setdefault(t, i)
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        # llama.cpp matches control + user-defined tokens, longest first
        self.specials = sorted((t for t, k in zip(tokens, types) if k in (3, 4)), key=len, reverse=True)
        self.byte = byte_alphabet()
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, piece: str) -> list[int]:
        if piece in self.cache:
            return self.cache[piece]
        syms = [self.byte[b] for b in piece.encode("utf-8")]
        while len(syms) > 1:
            best, at = None, -1
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        ids = [self.vocab[s] for s in syms]
        self.cache[piece] = ids
        return ids

    def _split(self, text: str) -> list[str]:
        pieces = [text]
        for rx in self.regexes:
            out = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    if m.start() > pos:
                        out.append(p[pos:m.start()])
                    out.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces

    def encode(self, text: str) -> list[int]:
        frags: list[tuple[str, bool]] = [(text, False)]
        for sp in self.specials:
            nxt = []
            for f, is_special in frags:
                if is_special or sp not in f:
                    nxt.append((f, is_special))
                    continue
                parts = f.split(sp)
                for j, part in enumerate(parts):
                    if part:
                        nxt.append((part, False))
                    if j < len(parts) - 1:
                        nxt.append((sp, True))
            frags = nxt
        ids: list[int] = []
        for f, is_special in frags:
            if is_special:
                ids.append(self.vocab[f])
            else:
                for piece in self._split(f):
                    ids.extend(self._bpe(piece))
        return ids


def first_diff(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return -1 if len(a) == len(b) else n


def mismatches(a: list[int], b: list[int]) -> int:
    """Positions that differ (plus the length difference)."""
    n = min(len(a), len(b))
    return int(np.count_nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))) + abs(len(a) - len(b))


def check_tensors(path: Path) -> dict:
    import gguf
    import torch
    from gguf import GGMLQuantizationType
    from transformers import AutoModelForCausalLM

    ckpt = load_gguf(path)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    print(f"  transformers loaded in {time.time() - t0:.1f}s")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    worst, worst_name, compared = 0.0, "", 0
    for name, load in ckpt.tensors.items():
        ours = load()
        theirs = sd.get(name)
        if theirs is None:
            raise SystemExit(f"{name} missing from transformers' state dict")
        if ours.shape != theirs.shape:
            raise SystemExit(f"{name}: shape {ours.shape} vs transformers {theirs.shape}")
        d = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        compared += 1
        if d > worst:
            worst, worst_name = d, name
    # the un-permutation matters: the raw GGUF row order is far from transformers' q_proj
    q_name = "model.layers.0.self_attn.q_proj.weight"
    raw = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    raw_q = gguf.dequantize(raw.data, raw.tensor_type).reshape(sd[q_name].shape)
    raw_diff = float(np.max(np.abs(raw_q - sd[q_name])))
    print(f"  layer-0 q_proj in raw GGUF row order vs transformers: max |diff| {raw_diff:.3g} "
          f"({'un-permuted on load' if raw_diff > 0 else 'not permuted in the file'})")
    only_theirs = sorted(set(sd) - set(ckpt.tensors)
                         - ({"lm_head.weight"} if ckpt.config["tie_word_embeddings"] else set()))
    print(f"  tensors: {compared} compared, max |diff| {worst:.3g} ({worst_name or 'all exact'}); "
          f"only in transformers: {only_theirs or 'none'}")

    # packed path: every type passed through as bytes, dequantized here, against float path
    all_types = {int(t): GGMLQuantizationType(t).name for t in GGMLQuantizationType}
    packed = load_gguf(path, packed_formats=all_types)
    dequantize = gguf.dequantize
    packed_worst, n_packed = 0.0, 0
    for name, load in packed.tensors.items():
        p = load()
        if not hasattr(p, "format"):
            continue
        qtype = GGMLQuantizationType[p.format]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w = p.data.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
        else:
            w = dequantize(p.data, qtype)
        d = float(np.max(np.abs(w.astype(np.float32).reshape(p.shape) - ckpt.tensors[name]())))
        packed_worst, n_packed = max(packed_worst, d), n_packed + 1
    print(f"  packed passthrough: {n_packed} tensors, max |dequant(packed) - float path| {packed_worst:.3g}")
    del model, sd
    return {"tensors": compared, "max_abs_diff": worst, "worst_tensor": worst_name,
            "only_in_transformers": only_theirs, "raw_order_q_diff": raw_diff,
            "packed_tensors": n_packed,
            "packed_max_abs_diff": packed_worst}


def check_tokenizer(path: Path, text: str) -> dict:
    import gguf
    from transformers import AutoTokenizer

    ckpt = load_gguf(path)
    ours = ckpt.tokenizer
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml")}
    ref = LlamaCppStyleBPE(meta)

    t0 = time.time()
    ids_ours = ours.encode(text, add_special_tokens=False).ids
    t1 = time.time()
    ids_theirs = theirs.encode(text, add_special_tokens=False)
    ids_ref = ref.encode(text)
    res = {"wikitext_tokens": len(ids_ours),
           "wikitext_mismatch_vs_transformers": mismatches(ids_ours, ids_theirs),
           "wikitext_first_diff_vs_transformers": first_diff(ids_ours, ids_theirs),
           "wikitext_tokens_transformers": len(ids_theirs),
           "wikitext_mismatch_vs_llamacpp_style": mismatches(ids_ours, ids_ref),
           "wikitext_tokens_llamacpp_style": len(ids_ref),
           "wikitext_roundtrip": ours.decode(ids_ours, skip_special_tokens=False) == text}
    print(f"  wikitext: {len(ids_ours)} tokens ({t1 - t0:.2f}s); transformers {len(ids_theirs)} "
          f"tokens, {res['wikitext_mismatch_vs_transformers']} mismatched; llama.cpp-style "
          f"{len(ids_ref)} tokens, {res['wikitext_mismatch_vs_llamacpp_style']} mismatched; "
          f"decode round trip {'ok' if res['wikitext_roundtrip'] else 'FAILED'}")
    i = res["wikitext_first_diff_vs_transformers"]
    if i >= 0:
        lo = max(0, i - 3)
        print(f"    first difference vs transformers at {i}: ours "
              f"{[ours.id_to_token(t) for t in ids_ours[lo:i + 4]]} theirs "
              f"{[theirs.convert_ids_to_tokens(t) for t in ids_theirs[lo:i + 4]]}")

    strings = [theirs.apply_chat_template(c, tokenize=False) for c in CHATS] + EXTRA_STRINGS
    bad_t = bad_r = bad_rt = 0
    for s in strings:
        a = ours.encode(s, add_special_tokens=False).ids
        bad_t += a != theirs.encode(s, add_special_tokens=False)
        bad_r += a != ref.encode(s)
        bad_rt += ours.decode(a, skip_special_tokens=False) != s
    print(f"  chat/special strings: {len(strings)}; differing from transformers {bad_t}, "
          f"from llama.cpp-style {bad_r}; round-trip failures {bad_rt}")
    res.update(chat_strings=len(strings), chat_mismatch_vs_transformers=bad_t,
               chat_mismatch_vs_llamacpp_style=bad_r, chat_roundtrip_failures=bad_rt)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--text", default=str(ROOT / "data/wikitext-2/wiki.test.raw"))
    ap.add_argument("--skip-tensors", action="store_true")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    report = {}
    for m in args.models:
        path = resolve(m)
        print(f"{m}: {path}")
        r = {} if args.skip_tensors else check_tensors(path)
        r.update(check_tokenizer(path, text))
        report[m] = r
    print(json.dumps(report))


if __name__ == "__main__":
    main()
