"""Adapter files that do not fit: each refusal names the module, shape or config key and
what would fit, before anything becomes resident."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import LORA_FIXTURES, load_base
from lattice_engine.adapters import AdapterSlots
from lattice_engine.errors import RequestError
from lattice_lora import load_peft, save_peft_safetensors


@pytest.fixture
def model():
    return load_base("llama")


def copy(tmp_path, base="llama"):
    dest = tmp_path / "adapter"
    shutil.copytree(LORA_FIXTURES / base, dest)
    (dest / "reference.safetensors").unlink()
    return dest


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_an_adapter_for_another_base_model(model):
    with pytest.raises(RequestError, match=r"for base model tests/fixtures/qwen3\): module "
                       r"'model.layers.0.self_attn.k_proj' has lora_A \(4, 64\) and lora_B "
                       r"\(64, 4\), but this model's .* is \[32, 64\]"):
        load_peft(LORA_FIXTURES / "qwen3", model)


def test_a_module_the_model_does_not_have(model, tmp_path):
    folder = copy(tmp_path)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.7.mlp.up_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
    tensors["base_model.model.model.layers.7.mlp.up_proj.lora_B.weight"] = np.zeros((96, 4), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(RequestError, match=r"targets module 'model.layers.7.mlp.up_proj', which "
                       r"LlamaForCausalLM|targets module 'model.layers.7.mlp.up_proj'.*linear "
                       r"modules are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
                       r"v_proj under model.layers"):
        load_peft(folder, model)


def test_a_target_module_name_that_matches_nothing(model, tmp_path):
    folder = copy(tmp_path)
    edit_config(folder, target_modules=["q_proj", "c_attn"])
    with pytest.raises(RequestError, match=r"target_modules names \['c_attn'\].*its linear "
                       r"modules are down_proj, gate_proj"):
        load_peft(folder, model)


@pytest.mark.parametrize("key,value,message", [
    ("modules_to_save", ["lm_head"], "modules_to_save = \\['lm_head'\\]: fully trained copies"),
    ("use_dora", True, "DoRA is not supported"),
    ("bias", "all", "trained biases are not supported"),
    ("peft_type", "IA3", "only LORA adapters"),
    ("r", 0, "r = 0 must be a positive number"),
])
def test_config_keys_that_cannot_be_honoured(model, tmp_path, key, value, message):
    folder = copy(tmp_path)
    edit_config(folder, **{key: value})
    with pytest.raises(RequestError, match=message):
        load_peft(folder, model)


def test_a_rank_the_config_does_not_give(model, tmp_path):
    folder = copy(tmp_path)
    edit_config(folder, r=8)
    with pytest.raises(RequestError, match=r"the config gives it rank 8, so they must be "
                       r"\(8, 96\) and \(64, 8\)"):
        load_peft(folder, model)


def test_truncated_missing_and_pickled_files(model, tmp_path):
    folder = copy(tmp_path)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[:len(data) - 100])
    with pytest.raises(RequestError, match="is truncated: tensor .* ends at byte"):
        load_peft(folder, model)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(RequestError, match="adapter_model.bin is a pickle and is never loaded"):
        load_peft(folder, model)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(RequestError, match="adapter_config.json is not valid JSON"):
        load_peft(folder, model)
    with pytest.raises(RequestError, match="is not a folder"):
        load_peft(tmp_path / "absent", model)


def test_a_failed_load_leaves_the_resident_adapters_alone(model, tmp_path):
    slots = AdapterSlots.of(model)
    slot = slots.add(load_peft(LORA_FIXTURES / "llama", model))
    before = {n: lin.adapters.factors[:] for n, lin in slots.linears.items()}
    with pytest.raises(RequestError):
        load_peft(LORA_FIXTURES / "qwen3", model)
    assert {n: lin.adapters.factors for n, lin in slots.linears.items()} == before
    assert list(slots.weights) == [slot]


def test_save_is_atomic_and_rewrites_in_place(model, tmp_path):
    weights = load_peft(LORA_FIXTURES / "llama", model)
    save_peft_safetensors(weights, tmp_path / "out")
    save_peft_safetensors(weights, tmp_path / "out")   # over an existing adapter
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]   # no temporary left behind
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
