"""Shared fixtures: the golden tiny checkpoints, with a byte-level tokenizer added."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# the native marker, LATTICE_REQUIRE_NATIVE and the kernel_variant fixture
pytest_plugins = ["lattice_engine.testing.pytest_plugin"]

FIXTURES = Path(__file__).parent / "fixtures"
ARCHITECTURES = ["llama", "llama_rope_scaled", "qwen2", "qwen3"]


def backends() -> list:
    """The op sets to test: numpy, and native, which shows as a skip (or a failure under
    LATTICE_REQUIRE_NATIVE=1) when the C kernels are not built."""
    return ["numpy", pytest.param("native", marks=pytest.mark.native)]


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_tokenizer():
    """A 256-token byte-level BPE (no merges): every byte is one token, like the fixtures'
    vocab of 256, so text round-trips exactly and any token id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # order by byte value so token id == byte value
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable mapping of bytes, the alphabet ByteLevel uses
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def fixture_with_tokenizer(name: str, dest: Path, eos_token_id: int = 0) -> Path:
    """Copy a golden fixture and give it tokenizer files and a ChatML template."""
    folder = dest / name
    shutil.copytree(FIXTURES / name, folder)
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    return fixture_with_tokenizer("llama", tmp_path)


@pytest.fixture(autouse=True)
def _fresh_plugin_manager(monkeypatch):
    """Each test builds its own plugin manager; none leaks a registration into another."""
    from lattice_engine import plugins
    monkeypatch.delenv(plugins.ALLOWLIST_ENV, raising=False)
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


def check_paged_against_golden(model, golden, cache, seqs, cut: int):
    """Row 0 prefills golden's prompt in two chunks (cut) while row 1 prefills whole in the
    second step, then both decode every golden step in one batch; each logit must equal
    transformers' (golden) within the float32 bound (`testing.tolerance.logits_bound`).
    seqs: two sequences with blocks (and state slots) reserved for the whole run."""
    import numpy as np
    from lattice_engine.models.paged_forward import PagedBatch
    from lattice_engine.testing.tolerance import logits_bound
    prompt, steps = golden["prompt_ids"], golden["decode_ids"]
    t = prompt.shape[1]
    atol = logits_bound(model, model.hidden_states(prompt, model.make_cache(batch=2)),
                        t + steps.shape[1])

    def run(items):
        return model.forward_paged(PagedBatch.build(cache, items), cache)

    first = run([(seqs[0], prompt[0, :cut], 0, True)])
    np.testing.assert_allclose(first[0], golden["prefill_logits"][0, cut - 1], atol=atol)
    both = run([(seqs[0], prompt[0, cut:], cut, True), (seqs[1], prompt[1], 0, True)])
    np.testing.assert_allclose(both, golden["prefill_logits"][:, -1], atol=atol)
    for i in range(steps.shape[1]):
        logits = run([(seqs[r], steps[r, i:i + 1], t + i, True) for r in range(2)])
        np.testing.assert_allclose(logits, golden["decode_logits"][:, i], atol=atol)

