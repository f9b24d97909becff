"""Fixtures of the spec_decode suite: the core's tiny golden checkpoints (llama family and
Qwen3.5) with the byte-level tokenizer, and engines that speculate with this plugin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lattice_engine.testing.checkpoints import write_tokenizer_files

# the native marker, LATTICE_REQUIRE_NATIVE and a fresh plugin manager around every test,
# shared with the core's suite
pytest_plugins = ["lattice_engine.testing.pytest_plugin"]

CORE_FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures"


def tiny_model(name: str, dest: Path, eos_token_id: int = -1) -> Path:
    """A copy of core fixture `name` with the byte-level tokenizer (random weights: eos -1
    never stops a run early)."""
    folder = Path(dest) / name
    shutil.copytree(CORE_FIXTURES / name, folder)
    return write_tokenizer_files(folder, eos_token_id)


def swap_two_tokens(folder: Path) -> Path:
    """Make the folder's tokenizer another one: tokens "a" and "b" trade ids."""
    path = Path(folder) / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    path.write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-models")
    return {name: tiny_model(name, root) for name in ("llama", "qwen2", "qwen3_5_text")}
