"""Fixtures for lattice-lora's tests: the core's tiny checkpoints and the PEFT adapters made
for them by scripts/make_lora_fixtures.py (tests/fixtures/lora/<base>/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load_file

# the native marker, LATTICE_REQUIRE_NATIVE and a fresh plugin manager around every test
pytest_plugins = ["lattice_engine.testing.pytest_plugin"]

CORE_FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures"
LORA_FIXTURES = CORE_FIXTURES / "lora"
# adapters under tests/fixtures/lora/<name>/, each on the core fixture of the same name
# unless BASE_OF says otherwise (qwen3_5_text_all: every linear of Qwen3.5 targeted)
BASES = ["llama", "qwen2", "qwen3", "qwen3_5_text", "qwen3_5_text_all"]
BASE_OF = {"qwen3_5_text_all": "qwen3_5_text"}


def backends() -> list:
    return ["numpy", pytest.param("native", marks=pytest.mark.native)]


def reference(base: str) -> dict:
    return load_file(str(LORA_FIXTURES / base / "reference.safetensors"))


def load_base(base: str, backend: str = "numpy", quant=None):
    from lattice_engine.loading import load
    from lattice_engine.quant.methods import QuantSpec
    return load(CORE_FIXTURES / BASE_OF.get(base, base), backend=backend,
                quant=QuantSpec(quant)).model
