"""GGUF import: config mapping, names, shapes, llama q/k un-permutation, Q8_0 passthrough,
corrupt files, and the rebuilt byte-level BPE tokenizer. Tiny GGUF files are written here
with gguf.GGUFWriter; no torch, no network. One test uses the real SmolLM2 GGUF when it
is already in the cache (skipped otherwise)."""

from __future__ import annotations

from pathlib import Path

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from lattice_engine.errors import CheckpointError  # noqa: E402
from lattice_engine.io import catalog  # noqa: E402
from lattice_engine.io.checkpoint import PackedTensor  # noqa: E402
from lattice_engine.io.gguf_reader import hf_tensor_name, load_gguf, unpermute_rows  # noqa: E402
from lattice_engine.io.gguf_tokenizer import byte_alphabet  # noqa: E402
from lattice_engine.quant.core_formats import q8_0_to_float  # noqa: E402
from lattice_engine.testing.gguf_header import add_transformer_header  # noqa: E402

Q8 = gguf.GGMLQuantizationType.Q8_0
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "c"), ("a", "t"),
          ("Ġc", "at"), ("1", "2")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER = ["<tool_call>"]


def tiny_vocab() -> tuple[list[str], list[int]]:
    byte_tokens = [byte_alphabet()[b] for b in range(256)]
    merged = list(dict.fromkeys(a + b for a, b in MERGES))
    tokens = byte_tokens + merged + SPECIALS + USER
    types = [1] * (len(byte_tokens) + len(merged)) + [3] * len(SPECIALS) + [4] * len(USER)
    return tokens, types


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF rows -> GGUF rows), written from its definition."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(arch: str, vocab: int, head_dim: int, tie: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": f(vocab, HIDDEN), "model.norm.weight": f(HIDDEN)}
    if not tie:
        w["lm_head.weight"] = f(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": f(HEADS * head_dim, HIDDEN),
                  p + "self_attn.k_proj.weight": f(KV_HEADS * head_dim, HIDDEN),
                  p + "self_attn.v_proj.weight": f(KV_HEADS * head_dim, HIDDEN),
                  p + "self_attn.o_proj.weight": f(HIDDEN, HEADS * head_dim),
                  p + "mlp.gate_proj.weight": f(FFN, HIDDEN),
                  p + "mlp.up_proj.weight": f(FFN, HIDDEN),
                  p + "mlp.down_proj.weight": f(HIDDEN, FFN),
                  p + "input_layernorm.weight": f(HIDDEN),
                  p + "post_attention_layernorm.weight": f(HIDDEN)})
        if arch == "qwen2":
            w.update({p + "self_attn.q_proj.bias": f(HEADS * head_dim),
                      p + "self_attn.k_proj.bias": f(KV_HEADS * head_dim),
                      p + "self_attn.v_proj.bias": f(KV_HEADS * head_dim)})
        if arch == "qwen3":
            w.update({p + "self_attn.q_norm.weight": f(head_dim),
                      p + "self_attn.k_norm.weight": f(head_dim)})
    return w


HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
              "output_norm.weight", "lm_head.weight": "output.weight"}
for _g, _h in {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v":
               "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm":
               "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "attn_norm":
               "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_gate":
               "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}.items():
    for _i in range(LAYERS):
        for _kind in ("weight", "bias"):
            HF_TO_GGUF[f"model.layers.{_i}.{_h}.{_kind}"] = f"blk.{_i}.{_g}.{_kind}"


def write_gguf(path: Path, arch: str = "llama", *, tie: bool = True, quant=False,
               pre: str = "smollm", add_bos: bool = False, head_dim: int = 16,
               seed: int = 0) -> dict:
    """Write a tiny model; return its HF-layout float32 weights."""
    tokens, types = tiny_vocab()
    w = hf_weights(arch, len(tokens), head_dim, tie, seed)
    wr = gguf.GGUFWriter(str(path), arch)
    add_transformer_header(wr, layers=LAYERS, hidden=HIDDEN, ffn=FFN, heads=HEADS,
                           kv_heads=KV_HEADS, eps=1e-5)
    if head_dim != HIDDEN // HEADS:
        wr.add_key_length(head_dim)
        wr.add_value_length(head_dim)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(pre)
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges([f"{a} {b}" for a, b in MERGES])
    wr.add_bos_token_id(tokens.index("<|im_start|>"))
    wr.add_eos_token_id(tokens.index("<|im_end|>"))
    wr.add_add_bos_token(add_bos)
    wr.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, t in w.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            t = gguf_permute(t, HEADS if ".q_proj." in name else KV_HEADS)
        if quant and t.ndim == 2:
            qt = Q8 if quant is True else quant  # quant: True (Q8_0) or a ggml type
            wr.add_tensor(HF_TO_GGUF[name], gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            wr.add_tensor(HF_TO_GGUF[name], t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return w


def test_name_mapping():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.0.attn_q_norm.weight") == "model.layers.0.self_attn.q_norm.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def test_unpermute_rows_inverts_converter_permutation():
    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(gguf_permute(w, heads)[unpermute_rows(48, heads)], w)
    assert not np.array_equal(gguf_permute(w, 2), w)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_float_model_loads_in_hf_layout(tmp_path, arch):
    head_dim = 32 if arch == "qwen3" else 16
    path = tmp_path / f"{arch}.gguf"
    w = write_gguf(path, arch, tie=(arch != "qwen2"), head_dim=head_dim)
    ck = load_gguf(path)
    assert set(ck.tensors) == set(w)
    c = ck.config
    assert c["model_type"] == arch
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (HEADS, KV_HEADS, head_dim)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0
    assert c["max_position_embeddings"] == 256 and c["vocab_size"] == len(tiny_vocab()[0])
    assert c["tie_word_embeddings"] is (arch != "qwen2")
    assert c["attention_bias"] is (arch == "qwen2")
    tokens = tiny_vocab()[0]
    assert c["bos_token_id"] == tokens.index("<|im_start|>")
    assert c["eos_token_id"] == tokens.index("<|im_end|>")
    assert "rope_scaling" not in c
    for name, ref in w.items():
        got = ck.tensors[name]()
        assert got.dtype == np.float32 and got.shape == ref.shape == ck.shapes[name], name
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_qwen_q_k_are_not_unpermuted(tmp_path):
    path = tmp_path / "q.gguf"
    w = write_gguf(path, "qwen2")
    q = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(load_gguf(path).tensors[q](), w[q])


def test_q8_0_passthrough_equals_quantize_then_read(tmp_path):
    path = tmp_path / "llama-q8.gguf"
    w = write_gguf(path, "llama", tie=False, quant=True)
    packed = load_gguf(path, packed_formats={int(Q8): "q8_0"})
    floats = load_gguf(path)
    for name, ref in w.items():
        p = packed.tensors[name]()
        if ref.ndim == 1:
            assert isinstance(p, np.ndarray) and p.dtype == np.float32
            continue
        assert isinstance(p, PackedTensor) and p.format == "q8_0" and p.shape == ref.shape
        assert p.data.dtype == np.uint8 and p.data.shape == (ref.shape[0], ref.shape[1] // 32 * 34)
        # rows quantize independently, so un-permuting packed rows == quantizing HF rows
        np.testing.assert_array_equal(p.data, gguf.quants.quantize(ref, Q8), err_msg=name)
        deq = q8_0_to_float(np.ascontiguousarray(p.data), ref.shape[1])
        np.testing.assert_array_equal(deq, floats.tensors[name](), err_msg=name)
        assert np.max(np.abs(deq - ref)) < 0.05 * np.max(np.abs(ref))


def test_a_gguf_file_loads_as_stored(tmp_path):
    """No quant method asked for: a Q8_0 file runs its own blocks (as llama.cpp would), not
    a float32 copy four times its size; an F32 file stays float32; a file of block types
    the core has no kernels for (here Q5_0) runs as q8_0 where q8_0 has SIMD kernels, its
    matrices rounded from the values they dequantize to, and as float32 elsewhere (numpy,
    the generic C); quant = "f32" still dequantizes."""
    from lattice_engine import kernels
    from lattice_engine.loading import load
    from lattice_engine.quant.methods import QuantSpec
    path = tmp_path / "q8.gguf"
    write_gguf(path, "qwen2", quant=True)
    loaded = load(path, backend="numpy")
    assert loaded.quant == "q8_0"
    up = loaded.model.layers[0].mlp.up_proj.weight
    assert up.format.name == "q8_0"
    raw = load_gguf(path, packed_formats={int(Q8): "q8_0"}).tensors[
        "model.layers.0.mlp.up_proj.weight"]().data
    assert np.array_equal(np.asarray(up.data), raw)  # the file's bytes, not re-quantized
    assert load(path, quant=QuantSpec("f32"), backend="numpy").quant == "f32"
    floats = tmp_path / "f32.gguf"
    write_gguf(floats, "qwen2")
    assert load(floats, backend="numpy").quant == "f32"
    other = tmp_path / "q5.gguf"
    write_gguf(other, "qwen2", quant=gguf.GGMLQuantizationType.Q5_0)
    assert load(other, backend="numpy").quant == "f32"
    exact = load(other, quant=QuantSpec("f32"), backend="numpy")
    assert exact.quant == "f32"
    if not kernels.available() or kernels.isa() == "generic":
        assert load(other).quant == "f32"
        return
    as_q8 = load(other, backend="native")
    assert as_q8.quant == "q8_0"
    up = as_q8.model.layers[0].mlp.up_proj.weight
    assert up.format.name in ("q8_0", "q8_0_r16")  # r16: the kernels' layout on some CPUs
    values = exact.model.layers[0].mlp.up_proj.weight.to_float()
    # q8_0's rounding: half a step (amax / 127 per block of 32) per value, plus the step's
    # own rounding to half precision (2^-11 relative) over up to 127 steps
    amax = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True)
    err = np.abs(up.to_float() - values).reshape(-1, 32)
    assert np.all(err <= 0.5 * amax / 127 + amax * 2.0 ** -11 + 1e-7)
    assert err.max() > 0  # rounded, not the file's values by accident


def test_packed_tensor_holds_the_file_bytes_when_not_permuted(tmp_path):
    from lattice_engine.io.gguf_file import read_gguf
    path = tmp_path / "v.gguf"
    write_gguf(path, "qwen2", quant=True)
    p = load_gguf(path, packed_formats={int(Q8): "q8_0"}).tensors["model.layers.0.mlp.up_proj.weight"]()
    entry = next(t for t in read_gguf(path)[1] if t.name == "blk.0.ffn_up.weight")
    raw = path.read_bytes()[entry.offset:entry.offset + entry.n_bytes]
    assert p.data.tobytes() == raw  # read as is, no float round trip


def test_f32_in_packed_formats_gives_bytes(tmp_path):
    path = tmp_path / "f.gguf"
    w = write_gguf(path, "llama")
    ck = load_gguf(path, packed_formats={0: "f32"})
    name = "model.layers.0.self_attn.k_proj.weight"
    p = ck.tensors[name]()
    assert isinstance(p, PackedTensor) and p.data.shape == (w[name].shape[0], w[name].shape[1] * 4)
    np.testing.assert_array_equal(np.ascontiguousarray(p.data).view(np.float32), w[name])
    assert isinstance(ck.tensors["model.norm.weight"](), np.ndarray)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "g.gguf"
    write_gguf(path, "gemma2")
    with pytest.raises(CheckpointError, match=r"'gemma2'.*llama, qwen2, qwen3"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.05, 0.5, 0.9, 0.9999])
def test_truncated_file_is_a_checkpoint_error(tmp_path, keep):
    path = tmp_path / "t.gguf"
    write_gguf(path, "llama")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        load_gguf(path)


def test_not_a_gguf_and_missing_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_corrupt_tensor_offset_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "c.gguf"
    write_gguf(path, "llama")
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(name) + len(name)
    # tensor info: n_dims u32, dims u64*n, type u32, offset u64 -> push the offset far out
    n_dims = int.from_bytes(data[at:at + 4], "little")
    off = at + 4 + 8 * n_dims + 4
    data[off:off + 8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt|truncated"):
        load_gguf(path)


def test_tokenizer_round_trip_and_specials(tmp_path):
    path = tmp_path / "tok.gguf"
    write_gguf(path, "llama", pre="smollm")
    ck = load_gguf(path)
    tok, tokens = ck.tokenizer, tiny_vocab()[0]
    text = "the cat in the hat 12 <|im_start|>user\nhé 🙂<|im_end|><tool_call>x"
    enc = tok.encode(text)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tokens.index("Ġthe") in enc.ids and tokens.index("Ġcat") in enc.ids
    for special in SPECIALS[1:] + USER:
        assert enc.ids.count(tokens.index(special)) == 1
    # smollm isolates digits, so the "1 2" merge never applies
    assert tokens.index("12") not in enc.ids
    assert tok.decode(enc.ids, skip_special_tokens=True).count("<|im_end|>") == 0
    assert ck.tokenizer_config["bos_token"] == "<|im_start|>"
    assert ck.tokenizer_config["eos_token"] == "<|im_end|>"
    assert ck.tokenizer_config["add_bos_token"] is False
    assert "messages" in ck.tokenizer_config["chat_template"]
    assert ck.generation_config["bos_token_id"] == tokens.index("<|im_start|>")
    assert ck.generation_config["eos_token_id"] == [tokens.index("<|im_end|>"),
                                                    tokens.index("<|endoftext|>")]


@pytest.mark.parametrize("pre,merged", [("gpt2", True), ("smollm", False), ("qwen2", False)])
def test_pre_tokenizer_follows_tokenizer_ggml_pre(tmp_path, pre, merged):
    path = tmp_path / "p.gguf"
    write_gguf(path, "qwen2", pre=pre)
    tok, tokens = load_gguf(path).tokenizer, tiny_vocab()[0]
    assert (tokens.index("12") in tok.encode("a 12").ids) is merged


def test_unknown_pre_tokenizer_is_named(tmp_path):
    path = tmp_path / "u.gguf"
    write_gguf(path, "llama", pre="mystery-bpe")
    with pytest.raises(CheckpointError, match="'mystery-bpe'.*smollm"):
        load_gguf(path)


def test_add_bos_token_prepends_bos(tmp_path):
    path = tmp_path / "b.gguf"
    write_gguf(path, "llama", add_bos=True)
    ck = load_gguf(path)
    bos = tiny_vocab()[0].index("<|im_start|>")
    assert ck.tokenizer.encode("the cat").ids[0] == bos
    assert ck.tokenizer.encode("the cat", add_special_tokens=False).ids[0] != bos
    assert ck.tokenizer_config["add_bos_token"] is True


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """The real SmolLM2 GGUF, pulled on first use like tests/test_smollm2.py (decided when
    the test runs, not at collection, so a fresh cache pulls instead of skipping)."""
    import os
    if os.environ.get("LATTICE_OFFLINE"):
        pytest.skip("LATTICE_OFFLINE is set: not pulling SmolLM2")
    return catalog.pull("smollm2-135m", quiet=True)


def test_real_smollm2_config_and_tokenizer(smollm2_gguf):
    path = smollm2_gguf
    ck = load_gguf(path, packed_formats={int(gguf.GGMLQuantizationType.Q4_1): "q4_1"})
    c = ck.config
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"]) == ("llama", 30, 576)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["intermediate_size"], c["vocab_size"], c["rope_theta"]) == (1536, 49152, 100000.0)
    assert c["tie_word_embeddings"] is True and c["max_position_embeddings"] == 8192
    assert len(ck.tensors) == 272
    tok = ck.tokenizer
    assert tok.encode("<|im_start|>user\nHello world!<|im_end|>").ids == [1, 4093, 198, 19556, 905, 17, 2]
    text = (Path(__file__).resolve().parents[1] / "data/wikitext-2/wiki.test.raw").read_text(
        encoding="utf-8")[:20000]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    # packed Q4_1 q_proj rows are un-permuted exactly like the float path
    q = "model.layers.0.self_attn.q_proj.weight"
    p = ck.tensors[q]()
    deq = gguf.dequantize(np.ascontiguousarray(p.data), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(deq.reshape(p.shape), load_gguf(path).tensors[q]())


def test_head_metadata_that_contradicts_tensors_is_named(tmp_path):
    path = tmp_path / "h.gguf"
    write_gguf(path, "qwen3", head_dim=32)
    data = bytearray(path.read_bytes())
    key = b"qwen3.attention.key_length"
    at = data.index(key) + len(key) + 4          # skip the u32 value type
    data[at:at + 4] = (24).to_bytes(4, "little")  # 4 heads x 24 != 128 q rows
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.weight.*128 rows.*4 heads of 24"):
        load_gguf(path)


def _string_array(strings: list[bytes]) -> memoryview:
    return memoryview(b"xyz" + b"".join(struct.pack("<Q", len(s)) + s for s in strings)
                      + b"tail")


@pytest.mark.parametrize("strings", [
    [b"a", b"", b"\xc4\xa0the", b"", b""],                 # empty strings, a UCS-2 letter
    ["h\u00e9 \U0001f642 \u4e16".encode(), b"ok", b"x" * 300],  # 4-byte UTF-8, long
    [b"bad \xff byte", b"cut \xe2\x82", b"\xe2\x82", b"fine"],  # invalid and cut UTF-8
    [b"nul \x00 inside", b"b", b"\x00"],                    # NUL: the one-by-one path
    [b"\x00\x00\x00\x00\x00\x00\x00\x00", b"c"],            # eight NULs in a string
], ids=["empty", "unicode", "invalid", "nul", "eight-nul"])
def test_string_arrays_decode_like_one_string_at_a_time(strings):
    from lattice_engine.io.gguf_file import _Cursor

    cur = _Cursor(_string_array(strings))
    cur.pos = 3
    got = cur.strings(len(strings))
    assert got == [s.decode("utf-8", "replace") for s in strings]
    assert bytes(cur.take(4)) == b"tail"  # the cursor ends right after the last one


def test_a_string_array_past_the_end_is_truncated():
    from lattice_engine.io.gguf_file import _Cursor, _Truncated

    buf = bytearray(_string_array([b"abc", b"defg"]))
    cur = _Cursor(memoryview(bytes(buf[:-4 - 2])))  # the second string cut short
    cur.pos = 3
    with pytest.raises(_Truncated):
        cur.strings(2)


def test_vocabulary_with_repeats_and_a_newline_in_a_merge():
    """The whole-list paths of build_tokenizer: a repeated token keeps its first id (as
    llama.cpp); a merge holding a newline takes the per-merge split (and, as no byte-level
    token holds one, is named as inconsistent); a merge of three parts is named."""
    from lattice_engine.io.gguf_tokenizer import build_tokenizer

    tokens, types = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens + ["Ġthe"], "tokenizer.ggml.token_type": types + [1],
            "tokenizer.ggml.merges": [f"{a} {b}" for a, b in MERGES]}
    tok = build_tokenizer(meta)
    assert tok.token_to_id("Ġthe") == tokens.index("Ġthe")
    assert tok.encode("the cat").ids == build_tokenizer(
        dict(meta, **{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types})
    ).encode("the cat").ids
    merges = meta["tokenizer.ggml.merges"]
    with pytest.raises(CheckpointError, match="inconsistent.*a\nb"):
        build_tokenizer(dict(meta, **{"tokenizer.ggml.merges": merges + ["a\nb c"]}))
    with pytest.raises(CheckpointError, match=r"merge #\d+ 'a  b' is not two tokens"):
        build_tokenizer(dict(meta, **{"tokenizer.ggml.merges": merges + ["a  b"]}))
