"""Qwen3.5-MoE from a GGUF written by llama.cpp's own converter (`qwen35moe`).

The fixtures tests/fixtures/qwen3_5_moe/llama_cpp_f32.gguf (experts stacked, gate and up
apart) and llama_cpp_q8_0_fused.gguf (Q8_0, the converter's --fuse-gate-up-exps) were made
from the same folder's safetensors (whose experts are HF's fused gate_up_proj / down_proj)
by scripts/make_qwen3_5_gguf.py, which runs llama.cpp's convert_hf_to_gguf.py. Besides what
it does to every Qwen3.5 checkpoint (tests/test_gguf_qwen3_5.py), the converter splits or
re-fuses the experts, renames the router and the shared expert. Undoing it must give the
model the safetensors load gives."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES, backends
from lattice_engine import loading
from lattice_engine.errors import CheckpointError
from lattice_engine.io import gguf_qwen35, gguf_reader
from lattice_engine.io.checkpoint import PackedTensor
from lattice_engine.io.gguf_file import read_gguf
from lattice_engine.io.gguf_reader import load_gguf
from lattice_engine.loading import load
from lattice_engine.testing.tolerance import logits_bound
from test_gguf_qwen3_5 import logits  # the f32 file = safetensors test covers this fixture too
from test_moe import _decode

FOLDER = FIXTURES / "qwen3_5_moe"
F32, Q8_FUSED = FOLDER / "llama_cpp_f32.gguf", FOLDER / "llama_cpp_q8_0_fused.gguf"


def test_every_tensor_comes_back_as_the_checkpoint_had_it():
    """Same values under HF names; the experts the converter split come back as the halves
    of the checkpoint's gate_up_proj."""
    hf = load_file(str(FOLDER / "model.safetensors"))
    got = {name: np.asarray(load()) for name, load in load_gguf(F32).tensors.items()}
    layers = json.loads((FOLDER / "config.json").read_text())["num_hidden_layers"]
    inter = json.loads((FOLDER / "config.json").read_text())["moe_intermediate_size"]
    for i in range(layers):
        p = f"model.layers.{i}.mlp.experts"
        fused = hf.pop(f"{p}.gate_up_proj")
        np.testing.assert_array_equal(got.pop(f"{p}.gate_proj"), fused[:, :inter])
        np.testing.assert_array_equal(got.pop(f"{p}.up_proj"), fused[:, inter:])
    assert sorted(got) == sorted(hf)
    one = np.float32(1)
    for name, want in hf.items():
        assert got[name].shape == want.shape, name
        if name.endswith("A_log"):  # stored as -exp(A_log): one rounding each way
            np.testing.assert_allclose(got[name], want, rtol=4e-7, err_msg=name)
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            np.testing.assert_array_equal(one + got[name], one + want, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_config_from_gguf_metadata_matches_the_checkpoint_config():
    want = json.loads((FOLDER / "config.json").read_text())
    got = load_gguf(F32).config
    assert got["architectures"] == ["Qwen3_5MoeForCausalLM"]
    for key in ("model_type", "hidden_size", "num_hidden_layers", "layer_types",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "linear_num_key_heads", "linear_num_value_heads", "vocab_size",
                "tie_word_embeddings", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "shared_expert_intermediate_size"):
        assert got[key] == want[key], key
    assert "intermediate_size" not in got  # the file has no dense MLP width


def test_q8_0_fused_experts_run_the_files_blocks_mapped():
    """--fuse-gate-up-exps' [E, 2I, H] tensor is HF's gate_up_proj; the experts are handed
    out as read-only views of the file's Q8_0 blocks, and the model they give equals the one
    built from every tensor dequantized to float32 first."""
    ids = load_file(str(FOLDER / "golden.safetensors"))["prompt_ids"]
    packed = load(Q8_FUSED, backend="numpy")
    experts = packed.checkpoint.tensors["model.layers.0.mlp.experts.gate_up_proj"]()
    assert isinstance(experts, PackedTensor) and experts.format == "q8_0"
    assert experts.shape == (8, 64, 64) and not experts.data.flags.writeable
    original = loading.open_checkpoint
    try:
        loading.open_checkpoint = lambda path, formats: load_gguf(path, packed_formats={})
        dequantized = load(Q8_FUSED, backend="numpy")
    finally:
        loading.open_checkpoint = original
    np.testing.assert_array_equal(logits(packed.model, ids), logits(dequantized.model, ids))


@pytest.mark.parametrize("backend", backends())
def test_f32_gguf_matches_transformers_over_prefill_and_decode(backend):
    golden = load_file(str(FOLDER / "golden.safetensors"))
    model = load(F32, backend=backend).model
    ids, steps = golden["prompt_ids"], golden["decode_ids"][:, :8]
    hidden = model.hidden_states(ids, model.make_cache(batch=2))
    bound = min(logits_bound(model, hidden, ids.shape[1] + golden["decode_ids"].shape[1]), 1e-4)
    cache = model.make_cache(batch=2)
    assert np.abs(model.forward(ids, cache) - golden["prefill_logits"]).max() <= bound
    decode = np.concatenate([model.forward(steps[:, i:i + 1], cache) for i in range(8)], axis=1)
    assert np.abs(decode - golden["decode_logits"][:, :8]).max() <= bound


@pytest.mark.native
def test_q8_0_fused_gguf_experts_run_inside_the_fused_step():
    """The file's experts run in the one C call per decode step, bit for bit the per-kernel
    path."""
    golden = load_file(str(FOLDER / "golden.safetensors"))
    model = load(Q8_FUSED, backend="native").model
    ids, steps = golden["prompt_ids"], golden["decode_ids"][:, :8]
    fused = _decode(model, ids, steps, True)
    assert model._decode_step() is not None
    np.testing.assert_array_equal(fused, _decode(model, ids, steps, False))


def _config_with(**changes):
    meta, tensors = read_gguf(F32)
    meta.update(changes)
    return meta, {t.name: t.shape for t in tensors}


@pytest.mark.parametrize("key,value,match", [
    ("qwen35moe.expert_gating_func", 2, r"expert_gating_func = 2.*softmax"),
    ("qwen35moe.expert_weights_norm", False, r"expert_weights_norm is false"),
    ("qwen35moe.expert_shared_feed_forward_length", -1, r"must be an integer >= 0"),
    ("qwen35moe.expert_count", 0, r"expert_count = 0 must be > 0"),
])
def test_metadata_another_model_would_have_is_refused(key, value, match):
    meta, shapes = _config_with(**{key: value})
    with pytest.raises(CheckpointError, match=match):
        gguf_qwen35.build_config(meta, shapes, F32)


def test_missing_expert_metadata_names_the_key():
    meta, shapes = _config_with()
    del meta["qwen35moe.expert_used_count"]
    with pytest.raises(CheckpointError, match=r"qwen35moe\.expert_used_count"):
        gguf_qwen35.build_config(meta, shapes, F32)


def test_shared_expert_width_comes_from_its_tensor_when_the_metadata_lacks_it():
    meta, shapes = _config_with()
    del meta["qwen35moe.expert_shared_feed_forward_length"]
    assert gguf_qwen35.build_config(meta, shapes, F32)["shared_expert_intermediate_size"] == 48


def test_an_expert_count_the_tensors_disagree_with_names_the_tensor(monkeypatch):
    meta, tensors = read_gguf(F32)
    meta["qwen35moe.expert_count"] = 16
    monkeypatch.setattr(gguf_reader, "_open", lambda path: (meta, tensors))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\..*\(8, 64\).*\(16, 64\)"):
        load(F32, backend="numpy")


def test_a_one_dimensional_shared_expert_gate_gets_hfs_shape():
    fix = gguf_qwen35._fixes("model.layers.0.mlp.shared_expert_gate.weight",
                             load_gguf(F32).config, (64,))
    assert fix.shape == (1, 64)


def test_moe_tensor_names():
    assert gguf_qwen35.hf_name("blk.2.ffn_gate_exps.weight", 4) == \
        "model.layers.2.mlp.experts.gate_proj"
    assert gguf_qwen35.hf_name("blk.2.ffn_gate_up_exps.weight", 4) == \
        "model.layers.2.mlp.experts.gate_up_proj"
    assert gguf_qwen35.hf_name("blk.2.ffn_gate_inp.weight", 4) == "model.layers.2.mlp.gate.weight"
    assert gguf_qwen35.hf_name("blk.2.ffn_gate_inp_shexp.weight", 4) == \
        "model.layers.2.mlp.shared_expert_gate.weight"
    assert gguf_qwen35.hf_name("blk.2.ffn_down_shexp.weight", 4) == \
        "model.layers.2.mlp.shared_expert.down_proj.weight"
