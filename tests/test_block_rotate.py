"""The block rotation op (online Hadamard, QuaRot) and models that use it: numpy
reference against a dense matrix, native against numpy, and the fused decode step."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES
from lattice_engine import kernels, ops
from lattice_engine.errors import CheckpointError
from lattice_engine.loading import load
from lattice_engine.testing.pytest_plugin import require as require_native
from lattice_engine.testing.tolerance import assert_matmul_close, logits_bound


def sylvester(n: int) -> np.ndarray:
    """The n x n Hadamard matrix of Sylvester's construction (n a power of two)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(m: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))
    return q


@pytest.mark.parametrize("m,block", [(1, 1), (1, 16), (3, 8), (19, 256), (7, 4)])
def test_reference_equals_dense_kronecker(m, block):
    mix = random_orthogonal(m)
    dense = np.kron(mix, sylvester(block)) / np.sqrt(block)
    np.testing.assert_allclose(dense @ dense.T, np.eye(m * block), atol=1e-12)
    x = np.random.default_rng(1).standard_normal((2, 3, m * block)).astype(np.float32)
    # the rotation is x @ dense: a dot product of length m * block (the fast transform's
    # log2(block) stages of sums stay within that product's bound)
    flat = x.reshape(-1, m * block)
    assert_matmul_close(ops.block_rotate(x, mix, block).reshape(flat.shape), flat @ dense,
                        flat, dense.T)


@pytest.mark.native
@pytest.mark.parametrize("m,block,rows", [(1, 2, 3), (1, 4096, 2), (5, 64, 7), (19, 256, 1),
                                          (19, 256, 33)])
def test_native_equals_reference(kernel_variant, m, block, rows):
    mix = random_orthogonal(m).astype(np.float32)
    dense = np.kron(mix.astype(np.float64), sylvester(block)) / np.sqrt(block)
    x = np.random.default_rng(2).standard_normal((rows, m * block)).astype(np.float32)
    assert_matmul_close(kernels.block_rotate(x, mix, block), ops.block_rotate(x, mix, block),
                        x, dense.T)


@pytest.mark.native
def test_native_refuses_bad_shapes_and_aliasing():
    x = np.ones((1, 24), np.float32)
    with pytest.raises(ValueError, match="power of two"):
        kernels.block_rotate(x, np.eye(2, dtype=np.float32), 12)
    with pytest.raises(ValueError, match="alias"):
        kernels.block_rotate(x, np.eye(3, dtype=np.float32), 8, out=x)


def with_online_rotation(tmp_path, name: str, spec) -> "Path":
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    config = json.loads((folder / "config.json").read_text())
    config["lattice_online_rotation"] = {"down_proj": spec}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_model_applies_the_online_rotation(tmp_path):
    # A rotation folded into nothing changes the function: logits must move, and the
    # native model (per-kernel and fused step) must agree with the numpy one.
    cfg = json.loads((FIXTURES / "qwen2" / "config.json").read_text())
    f = cfg["intermediate_size"]
    block = f & -f
    mix = random_orthogonal(f // block).tolist()
    folder = with_online_rotation(tmp_path, "qwen2", {"block": block, "mix": mix})
    ids = load_file(str(FIXTURES / "qwen2" / "golden.safetensors"))["prompt_ids"]
    plain = load(FIXTURES / "qwen2", backend="numpy").model
    rotated = load(folder, backend="numpy").model
    ref = rotated.forward(ids, rotated.make_cache(batch=2))
    bound = logits_bound(rotated, rotated.hidden_states(ids, rotated.make_cache(batch=2)),
                         ids.shape[1])
    assert np.abs(ref - plain.forward(ids, plain.make_cache(batch=2))).max() > 1e-3
    require_native()
    native = load(folder, backend="native").model
    for fused in (False, True):
        native.fused_decode = fused
        cache = native.make_cache(batch=2)
        got = [native.forward(ids[:, :-1], cache), native.forward(ids[:, -1:], cache)]
        assert np.abs(np.concatenate(got, axis=1) - ref).max() <= bound


@pytest.mark.parametrize("spec,message", [
    ({"block": 3, "mix": [[1.0]]}, "power of two"),
    ({"block": 2, "mix": [[2.0]]}, "orthogonal"),
    ({"mix": [[1.0]]}, "must be"),
])
def test_bad_online_rotation_is_a_checkpoint_error(tmp_path, spec, message):
    folder = with_online_rotation(tmp_path, "llama", spec)
    with pytest.raises(CheckpointError, match=message):
        load(folder, backend="numpy")
