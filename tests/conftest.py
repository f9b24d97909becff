"""Shared fixtures: the golden tiny checkpoints, with a byte-level tokenizer added (the
helpers a plugin's suite needs too live in lattice_engine.testing)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lattice_engine.testing.checkpoints import (CHATML, byte_level_tokenizer,  # noqa: F401
                                             write_tokenizer_files)

# the native marker, LATTICE_REQUIRE_NATIVE, the kernel_variant fixture and a fresh plugin
# manager around every test
pytest_plugins = ["lattice_engine.testing.pytest_plugin"]

FIXTURES = Path(__file__).parent / "fixtures"
ARCHITECTURES = ["llama", "llama_rope_scaled", "qwen2", "qwen3"]


def backends() -> list:
    """The op sets to test: numpy, and native, which shows as a skip (or a failure under
    LATTICE_REQUIRE_NATIVE=1) when the C kernels are not built."""
    return ["numpy", pytest.param("native", marks=pytest.mark.native)]


def fixture_with_tokenizer(name: str, dest: Path, eos_token_id: int = 0) -> Path:
    """Copy a golden fixture and give it tokenizer files and a ChatML template."""
    folder = dest / name
    shutil.copytree(FIXTURES / name, folder)
    return write_tokenizer_files(folder, eos_token_id)


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    return fixture_with_tokenizer("llama", tmp_path)


def check_paged_against_golden(model, golden, cache, seqs, cut: int, kv_unit: float = 0.0):
    """Row 0 prefills golden's prompt in two chunks (cut) while row 1 prefills whole in the
    second step, then both decode every golden step in one batch; each logit must equal
    transformers' (golden) within the float32 bound (`testing.tolerance.logits_bound`),
    plus, with kv_unit > 0 (a cache storing K/V at that roundoff, e.g. f16's U16), the
    storage's (`kv_storage_bound`).
    seqs: two sequences with blocks (and state slots) reserved for the whole run."""
    import numpy as np
    from lattice_engine.models.paged_forward import PagedBatch
    from lattice_engine.testing.tolerance import kv_storage_bound, logits_bound
    prompt, steps = golden["prompt_ids"], golden["decode_ids"]
    t = prompt.shape[1]
    hidden = model.hidden_states(prompt, model.make_cache(batch=2))
    atol = logits_bound(model, hidden, t + steps.shape[1])
    if kv_unit:
        atol += kv_storage_bound(model, hidden, t + steps.shape[1], kv_unit)

    def run(items):
        return model.forward_paged(PagedBatch.build(cache, items), cache)

    first = run([(seqs[0], prompt[0, :cut], 0, True)])
    np.testing.assert_allclose(first[0], golden["prefill_logits"][0, cut - 1], atol=atol)
    both = run([(seqs[0], prompt[0, cut:], cut, True), (seqs[1], prompt[1], 0, True)])
    np.testing.assert_allclose(both, golden["prefill_logits"][:, -1], atol=atol)
    for i in range(steps.shape[1]):
        logits = run([(seqs[r], steps[r, i:i + 1], t + i, True) for r in range(2)])
        np.testing.assert_allclose(logits, golden["decode_logits"][:, i], atol=atol)

