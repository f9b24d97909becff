"""Qwen3.5 from a GGUF written by llama.cpp's own converter (`qwen35`).

The fixtures tests/fixtures/qwen3_5_text/llama_cpp_{f32,q8_0}.gguf were made from the same
folder's safetensors by scripts/make_qwen3_5_gguf.py, which runs llama.cpp's
convert_hf_to_gguf.py; the converter rewrites norms (1 + w), A_log (-exp), the conv kernel's
shape and, since this config has 2 key heads for 4 value heads, the order of the value heads.
Undoing all of it must give the model the safetensors load gives."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES, backends
from lattice_engine import loading
from lattice_engine.errors import CheckpointError
from lattice_engine.io import gguf_qwen35
from lattice_engine.io.gguf_reader import load_gguf
from lattice_engine.loading import load
from lattice_engine.testing.tolerance import logits_bound

FOLDER = FIXTURES / "qwen3_5_text"
F32, Q8 = FOLDER / "llama_cpp_f32.gguf", FOLDER / "llama_cpp_q8_0.gguf"


def prompt(folder=FOLDER):
    return load_file(str(folder / "golden.safetensors"))["prompt_ids"]


def logits(model, ids):
    return model.forward(ids, model.make_cache(batch=ids.shape[0]))


@pytest.mark.parametrize("folder", [FOLDER, FIXTURES / "qwen3_5_moe"], ids=["dense", "moe"])
@pytest.mark.parametrize("backend", backends())
def test_f32_gguf_gives_the_safetensors_model(backend, folder):
    """Dense (`qwen35`) and MoE (`qwen35moe`, tests/test_gguf_qwen3_5_moe.py) alike."""
    ids = prompt(folder)
    ours = load(folder, backend=backend).model
    theirs = load(folder / "llama_cpp_f32.gguf", backend=backend).model
    assert type(theirs) is type(ours)
    expected = logits(ours, ids)
    bound = logits_bound(ours, ours.hidden_states(ids, ours.make_cache(batch=ids.shape[0])),
                         ids.shape[1])
    assert np.abs(logits(theirs, ids) - expected).max() <= bound


def test_every_tensor_comes_back_as_the_checkpoint_had_it():
    hf = load_file(str(FOLDER / "model.safetensors"))
    gguf = load_gguf(F32)
    assert sorted(gguf.tensors) == sorted(hf)
    for name, want in hf.items():
        got = gguf.tensors[name]()
        assert got.shape == want.shape, name
        if name.endswith("A_log"):  # stored as -exp(A_log): one rounding each way
            np.testing.assert_allclose(got, want, rtol=4e-7, err_msg=name)
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            # stored as 1 + w, which is what the model computes from w: that sum is exact
            one = np.float32(1)
            np.testing.assert_array_equal(one + got, one + want, err_msg=name)
        else:  # permutations and reshapes are exact
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_config_from_gguf_metadata_matches_the_checkpoint_config():
    import json
    want = json.loads((FOLDER / "config.json").read_text())
    got = load_gguf(F32).config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "layer_types",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                "linear_num_key_heads", "linear_num_value_heads", "vocab_size",
                "tie_word_embeddings", "max_position_embeddings"):
        assert got[key] == want[key], key
    for key in ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"):
        assert got["rope_parameters"][key] == want["rope_parameters"][key], key


def test_q8_0_gguf_packed_rows_are_the_dequantized_rows():
    """The file's q8_0 blocks are used as they are (value-head rows permuted in their packed
    form); the numpy op set computes with the dequantized weights, so the model equals the
    one built from every tensor dequantized to float32 first."""
    ids = prompt()
    packed = load(Q8, backend="numpy")
    kinds = {type(packed.checkpoint.tensors[n]()).__name__ for n in packed.checkpoint.tensors}
    assert "PackedTensor" in kinds
    original = loading.open_checkpoint
    try:
        loading.open_checkpoint = lambda path, formats: load_gguf(path, packed_formats={})
        dequantized = load(Q8, backend="numpy")
    finally:
        loading.open_checkpoint = original
    np.testing.assert_array_equal(logits(packed.model, ids), logits(dequantized.model, ids))


def test_grouped_order_undoes_the_converters_tiling():
    # the converter stores value head (key group k, member j) at position j * num_k + k
    num_k, per_k, d = 3, 4, 2
    hf = np.arange(num_k * per_k * d)
    tiled = np.empty_like(hf)
    for k in range(num_k):
        for j in range(per_k):
            tiled[(j * num_k + k) * d:(j * num_k + k + 1) * d] = hf[(k * per_k + j) * d:
                                                                   (k * per_k + j + 1) * d]
    assert np.array_equal(tiled[gguf_qwen35.grouped_order(hf.size, num_k, per_k, d)], hf)


def test_mtp_layers_get_their_hf_names():
    assert gguf_qwen35.hf_name("blk.24.nextn.eh_proj.weight", 24) == "mtp.fc.weight"
    assert gguf_qwen35.hf_name("blk.24.nextn.enorm.weight", 24) == \
        "mtp.pre_fc_norm_embedding.weight"
    assert gguf_qwen35.hf_name("blk.24.attn_q.weight", 24) == \
        "mtp.layers.0.self_attn.q_proj.weight"
    assert gguf_qwen35.hf_name("blk.23.ssm_a", 24) == "model.layers.23.linear_attn.A_log"
    assert gguf_qwen35.hf_name("blk.3.something_new.weight", 24) is None


def test_missing_metadata_names_the_key():
    from lattice_engine.io.gguf_file import read_gguf
    meta, tensors = read_gguf(F32)
    del meta["qwen35.ssm.state_size"]
    with pytest.raises(CheckpointError, match=r"qwen35\.ssm\.state_size"):
        gguf_qwen35.build_config(meta, {t.name: t.shape for t in tensors}, F32)


def test_packed_columns_move_in_whole_blocks():
    """A value head of a whole number of q8_0 blocks moves in out_proj's packed rows as its
    dequantized columns would (the fixture's heads of 16 are dequantized instead, so this
    checks the packed path on one of its q8_0 tensors with heads of 32)."""
    from gguf import GGML_QUANT_SIZES

    from lattice_engine.io.gguf_file import read_gguf
    from lattice_engine.quant.formats import PackedMatrix
    from lattice_engine.plugins import get_plugin_manager
    _, tensors = read_gguf(Q8)
    t = next(t for t in tensors if t.name == "blk.0.ssm_out.weight")
    assert t.tensor_type.name == "Q8_0" and t.shape == (64, 64)
    fix = gguf_qwen35._Fix()
    fix.cols, fix.col_chunk = np.array([1, 0]), 32
    block, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
    packed = gguf_qwen35._packed_loader(Q8, t, "q8_0", fix, t.shape, block_bytes, block)()
    q8 = get_plugin_manager().registry.get("weight_formats", "q8_0")
    as_float = PackedMatrix(q8, t.shape[0], t.shape[1], packed.data).to_float()
    np.testing.assert_array_equal(as_float, gguf_qwen35._float_loader(t, fix)())


def test_plain_matrices_are_read_a_slice_of_rows_at_a_time():
    """Matrices the converter left as they are can be converted at load slice by slice
    (io/stored.py: no whole-tensor float copy); the permuted ones are read whole."""
    from lattice_engine.io.stored import StoredTensor
    ck = load_gguf(F32)
    up = ck.tensors["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(up, StoredTensor)
    np.testing.assert_array_equal(up.rows()[3:11], up()[3:11])
    assert not isinstance(ck.tensors["model.layers.0.linear_attn.in_proj_z.weight"],
                          StoredTensor)
