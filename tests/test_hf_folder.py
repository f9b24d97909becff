"""HF folders: sharded safetensors with an index, bf16 weights, missing shards."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, fixture_with_tokenizer
from lattice_engine.errors import CheckpointError
from lattice_engine.loading import load
from lattice_engine.testing.tolerance import logits_bound


def shard(folder, names_per_shard):
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for i, names in enumerate(names_per_shard):
        file = f"model-{i + 1:05d}-of-{len(names_per_shard):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file))
        weight_map.update({n: file for n in names})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def reference_logits(name):
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    return golden["prompt_ids"], golden["prefill_logits"]


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    folder = fixture_with_tokenizer("qwen2", tmp_path)
    names = sorted(load_file(str(folder / "model.safetensors")))
    shard(folder, [names[: len(names) // 2], names[len(names) // 2:]])
    ids, expected = reference_logits("qwen2")
    model = load(folder, backend="numpy").model
    bound = logits_bound(model, model.hidden_states(ids, model.make_cache(batch=2)), ids.shape[1])
    assert np.abs(model.forward(ids, model.make_cache(batch=2)) - expected).max() <= bound


def test_missing_shard_is_named(tmp_path):
    folder = fixture_with_tokenizer("qwen2", tmp_path)
    names = sorted(load_file(str(folder / "model.safetensors")))
    shard(folder, [names[:10], names[10:]])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load(folder, backend="numpy")


@pytest.mark.parametrize("value,says", [
    (5, "weight_map names shard 5"), ("../model.safetensors", "names shard '../model"),
    ("..", "names shard '..'"), ("", "names shard ''"),
    ("a\nb.safetensors", "shard(s) 'a\\nb.safetensors' named in")])
def test_an_index_naming_no_file_in_the_folder_is_refused(tmp_path, value, says):
    # outside the folder (path traversal), not a name, or a name whose error must stay one line
    folder = fixture_with_tokenizer("qwen2", tmp_path)
    names = sorted(load_file(str(folder / "model.safetensors")))
    shard(folder, [names[:10], names[10:]])
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][names[0]] = value
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        load(folder, backend="numpy")
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bf16_weights_are_widened_exactly(tmp_path):
    folder = fixture_with_tokenizer("llama", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    # write every tensor as raw bf16 (the top 16 bits of float32) with a hand-made header
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        raw = (value.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head +
                                               b"".join(blobs))
    model = load(folder, backend="numpy").model
    name = "model.layers.0.mlp.up_proj.weight"
    truncated = (tensors[name].view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(model.layers[0].mlp.up_proj.weight.to_float(), truncated)
