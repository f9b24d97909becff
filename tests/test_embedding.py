"""Embeddings: the BERT encoder and pooling against sentence-transformers / transformers
(tests/fixtures/bert and tests/fixtures/embedding, made by scripts/make_embedding_fixtures.py),
last-token pooling of a decoder against transformers run left-padded, the
sentence-transformers folder layout, Matryoshka dimensions, input checks, and the
layer_norm / gelu kernels against their numpy definitions.

Tolerances: `testing.tolerance.network_bound` over the encoder's dot-product path, from
the reference's own magnitudes (two float32 evaluations in different orders)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES, backends
from lattice_engine.embedding import Pooling, l2_normalize, pool, read_pooling
from lattice_engine.engine import Engine
from lattice_engine.errors import CheckpointError, ConfigError, RequestError
from lattice_engine.testing.tolerance import U32, U_BF16X3, decoder_path, network_bound

BERT = FIXTURES / "bert"
GOLD = FIXTURES / "embedding"
TEXTS = json.loads((GOLD / "golden.json").read_text())["texts"]


def encoder_bound(model, magnitude: float, positions: int) -> float:
    c = model.config
    # on AMX-BF16 machines the native encoder's linears are bf16x3 products (kernels.encoder)
    from lattice_engine.kernels import encoder
    bf16x3 = any(encoder.is_bf16x3(w) for layer in model.layers
                 for w in getattr(layer, "fast", {}).values())
    return network_bound(magnitude, decoder_path(c.hidden_size, c.intermediate_size, c.head_dim,
                                                 c.num_attention_heads, c.num_hidden_layers,
                                                 positions),
                         unit=U_BF16X3 if bf16x3 else U32)


@pytest.mark.parametrize("backend", backends())
def test_sentence_transformers_embeddings(backend):
    golden = load_file(str(GOLD / "bert_golden.safetensors"))
    engine = Engine.load(str(BERT), backend=backend)
    assert engine.embedder.pooling.mode == "mean" and engine.embedder.pooling.normalize
    assert engine.embedder.pooling.max_tokens == 32  # sentence_bert_config.json
    got = engine.embed(TEXTS, truncate=True)
    want = golden["st_embeddings"]
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= encoder_bound(engine.model, 1.0, 32)
    cos = (got * want).sum(1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 1 - 1e-6
    # the long text really was cut (and the others were not)
    lengths = [len(ids) for ids in engine.embedder.tokenize(TEXTS, truncate=True)]
    assert max(lengths) == 32 and sorted(lengths)[-2] < 32


@pytest.mark.parametrize("backend", backends())
def test_encoder_hidden_states_right_padded(backend):
    golden = load_file(str(GOLD / "bert_golden.safetensors"))
    model = Engine.load(str(BERT), backend=backend).model
    hidden = model.encode(golden["tokens"], golden["mask"])
    real = golden["mask"].astype(bool)
    bound = encoder_bound(model, np.abs(golden["hidden"]).max(), golden["tokens"].shape[1])
    assert np.abs(hidden - golden["hidden"])[real].max() <= bound
    # a padded row equals the sequence alone
    row = 2
    n = int(golden["mask"][row].sum())
    alone = model.encode(golden["tokens"][row:row + 1, :n], np.ones((1, n), np.int64))
    assert np.abs(alone[0] - hidden[row, :n]).max() <= bound


def test_pooling_modes_against_numpy_definitions():
    golden = load_file(str(GOLD / "bert_golden.safetensors"))
    h, m = golden["hidden"], golden["mask"]
    lengths = m.sum(1)
    want_mean = np.stack([h[r, :n].mean(0) for r, n in enumerate(lengths)])
    assert np.allclose(pool(h, m, "mean"), want_mean, atol=1e-6)
    assert np.array_equal(pool(h, m, "cls"), h[:, 0])
    assert np.array_equal(pool(h, m, "last"), np.stack([h[r, n - 1] for r, n in enumerate(lengths)]))
    assert np.array_equal(pool(h, m, "max"), np.stack([h[r, :n].max(0) for r, n in enumerate(lengths)]))
    left = np.zeros_like(m)  # left padding: 'last' is the last column
    for r, n in enumerate(lengths):
        left[r, m.shape[1] - n:] = 1
    assert np.array_equal(pool(h, left, "last"), h[:, -1])


@pytest.mark.parametrize("backend", backends())
def test_last_token_pooling_of_a_decoder_matches_transformers_left_padded(backend):
    golden = load_file(str(GOLD / "qwen3_last_token.safetensors"))
    engine = Engine.load(str(FIXTURES / "qwen3"), backend=backend)
    assert engine.embedder.pooling.mode == "last" and engine.embedder.pooling.normalize
    ids = [row[mask.astype(bool)].tolist() for row, mask in zip(golden["tokens"], golden["mask"])]
    got = engine.embed(ids)
    assert np.abs(got - golden["embeddings"]).max() <= 1e-4


def test_matryoshka_dimensions_and_normalize_switch():
    engine = Engine.load(str(BERT), backend="numpy")
    full = engine.embed(TEXTS[:3], normalize=False)
    cut = engine.embed(TEXTS[:3], dimensions=16)
    assert cut.shape == (3, 16)
    assert np.allclose(cut, l2_normalize(full[:, :16]), atol=1e-6)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
    for bad in (0, 65, 2.5, "8"):
        with pytest.raises(RequestError, match="dimensions"):
            engine.embed("x", dimensions=bad)


def test_batching_does_not_change_results():
    engine = Engine.load(str(BERT), backend="numpy")
    together = engine.embed(TEXTS, truncate=True)
    model = engine.model
    bound = encoder_bound(model, 1.0, 32)
    for i, text in enumerate(TEXTS):
        alone = engine.embed(text, truncate=True)
        assert np.abs(alone[0] - together[i]).max() <= bound


def test_the_encoder_matmul_this_cpu_runs_stays_within_float32s_embeddings():
    """The BERT encoder takes this machine's encoder matmul (kernels.encoder: bf16x3 on
    AMX-BF16, panels on AVX2 without AVX-512) for every linear, and its embeddings stay
    within cosine 1e-6 of the float32 kernels'."""
    engine = Engine.load(str(BERT))
    if not all(layer.fast for layer in engine.model.layers):  # 64 / 128 wide: all packable
        pytest.skip("this CPU (or process) runs no encoder matmul")
    texts = ["the city of lights", "a", "numbers 1 2 3 and more words than the others here"]
    fast = engine.embed(texts, truncate=True)
    for layer in engine.model.layers:
        layer.fast.clear()
    exact = engine.embed(texts, truncate=True)
    cos = (fast * exact).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(exact, axis=1)
    assert cos.min() >= 1 - 1e-6 and not np.array_equal(fast, exact)


def test_input_shapes_and_errors():
    engine = Engine.load(str(BERT), backend="numpy")
    tok = engine.embedder.tokenize
    one = tok("the city")
    assert tok(["the city"]) == one and tok(one[0]) == one and tok(one) == one
    assert np.allclose(engine.embed(one[0]), engine.embed("the city"))
    with pytest.raises(RequestError, match="empty string"):
        tok(["ok", ""])
    with pytest.raises(RequestError, match="no input"):
        tok([])
    with pytest.raises(RequestError, match="at least one token"):
        tok([[]])
    with pytest.raises(RequestError, match=r"0\.\.\d+"):
        tok([[1, 10 ** 6]])
    with pytest.raises(RequestError, match="string or a list of token ids"):
        tok([{"a": 1}])
    long = " ".join(["city"] * 40)
    with pytest.raises(RequestError, match=r"42 tokens; this model embeds at most 32"):
        tok(long)
    assert len(tok(long, truncate=True)[0]) == 32


def test_instruction_prefix_and_named_prompts(tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(BERT, folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "search the data: ", "document": ""},
         "default_prompt_name": "document"}))
    engine = Engine.load(str(folder), backend="numpy")
    plain = engine.embedder.tokenize("river")
    assert engine.embedder.tokenize("river", prompt="document") == plain
    query = engine.embedder.tokenize("river", prompt="query")
    assert query == engine.embedder.tokenize("search the data: river")
    assert engine.embedder.tokenize("river", instruction="search the data: ") == query
    with pytest.raises(RequestError, match="not one of this model's prompts"):
        engine.embedder.tokenize("river", prompt="nope")


def test_sentence_transformers_layout(tmp_path):
    folder = tmp_path / "st"
    shutil.copytree(BERT, folder)
    p = read_pooling(folder, encoder=True, hidden_size=64, max_positions=64)
    assert (p.mode, p.normalize, p.max_tokens) == ("mean", True, 32)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize module
    p = read_pooling(folder, encoder=True, hidden_size=64, max_positions=64)
    assert (p.mode, p.normalize) == ("cls", False)
    engine = Engine.load(str(folder), backend="numpy")
    hidden = engine.model.encode(np.array([engine.embedder.tokenize("the city")[0]]),
                                 np.ones((1, 4), np.int64))
    assert np.allclose(engine.embed("the city")[0], hidden[0, 0], atol=1e-6)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(CheckpointError, match="mean_sqrt_len"):
        read_pooling(folder, encoder=True, hidden_size=64, max_positions=64)
    # no layout at all: encoders mean-pool, decoders take the last token; both normalise
    assert read_pooling(None, encoder=True, hidden_size=8, max_positions=16).mode == "mean"
    assert read_pooling(tmp_path, encoder=False, hidden_size=8, max_positions=16).mode == "last"
    with pytest.raises(CheckpointError, match="pooling mode"):
        Pooling("sum", True, 8, 16)


def test_an_encoder_cannot_generate():
    engine = Engine.load(str(BERT), backend="numpy")
    assert not engine.can_generate
    with pytest.raises(ConfigError, match="embedding-only"):
        engine.generate("hello", max_tokens=2)
    with pytest.raises(ConfigError, match="embedding-only"):
        engine.start_batching()


def test_bert_config_errors(tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(BERT, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, hidden_act="relu")))
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        Engine.load(str(folder), backend="numpy")
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_attention_heads=5)))
    with pytest.raises(CheckpointError, match="not a multiple"):
        Engine.load(str(folder), backend="numpy")


@pytest.mark.native
def test_layer_norm_and_gelu_kernels_match_numpy():
    from lattice_engine import kernels, ops
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 100)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(100).astype(np.float32)
    b = rng.standard_normal(100).astype(np.float32)
    want = ops.layer_norm(x, w, b, 1e-12)
    got = kernels.layer_norm(x, w, b, 1e-12)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    y = np.linspace(-8, 8, 100_003, dtype=np.float32)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in y.astype(np.float64)])
    for impl in (ops.gelu, kernels.gelu):
        assert np.abs(impl(y) - exact).max() <= 4e-7 * 8
    tanh_form = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y.astype(np.float64) ** 3)))
    assert np.abs(kernels.gelu(y, tanh=True) - tanh_form).max() <= 1e-5
    assert np.abs(ops.gelu(y, tanh=True) - tanh_form).max() <= 1e-5


def test_the_contract_accepts_an_encoder_and_names_both_shapes():
    from lattice_engine.contract import check_architecture
    from lattice_engine.errors import PluginError
    from lattice_engine.models.bert import Model

    check_architecture("core", "bert", Model)  # encode + from_checkpoint: accepted

    class Neither:
        @classmethod
        def from_checkpoint(cls, checkpoint, loader, ops):
            return cls()

    with pytest.raises(PluginError, match=r"lacks forward.*`encode` instead, see Encoder"):
        check_architecture("p", "x", Neither)


# (B, T, H, D), lengths: the AVX2 tiles' edges (a 6-row score tile, 16 keys, a 96-row
# task, values 32 at a time, D = 20 on the scalar path), the 512-bit tiles' (32 keys,
# D = 48: 32 + 16 values) and a one-key row
ENCODER_SHAPES = [((3, 13, 5, 24), [13, 1, 7]), ((2, 200, 3, 32), [200, 101]),
                  ((2, 97, 2, 64), [97, 9]), ((1, 50, 2, 20), [50]), ((1, 40, 1, 72), [33]),
                  ((2, 70, 2, 48), [70, 3])]


@pytest.fixture(params=["avx2", "avx512vnni"])
def attention_tiles(request):
    """The AVX2 tiles and, on AVX-512 CPUs, the 512-bit ones (they run with the
    avx512vnni q8_0 variant, as the 512-bit float matmuls)."""
    from lattice_engine import kernels
    before = kernels.q8_variant()
    if kernels.q8_variant(request.param) != request.param:
        kernels.q8_variant(before)
        pytest.skip(f"this CPU has no {request.param} kernels")
    yield request.param
    kernels.q8_variant(before)


@pytest.mark.native
@pytest.mark.parametrize("shape,lengths", ENCODER_SHAPES)
def test_encoder_attention_kernel_matches_numpy(shape, lengths, attention_tiles):
    from lattice_engine import kernels, ops
    from lattice_engine.testing.tolerance import dot_bound
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    lengths = np.array(lengths)
    d, t = shape[3], shape[1]
    want = ops.encoder_attention(q, k, v, lengths, 0.2)
    got = kernels.encoder_attention(q, k, v, lengths, 0.2)
    scores_mag = 0.2 * np.abs(q).max() * np.abs(k).max() * d
    bound = float(dot_bound(d + t, np.abs(v).max() * max(1.0, scores_mag)))
    for b, n in enumerate(lengths):
        assert np.abs(got[b, :n] - want[b, :n]).max() <= bound


@pytest.mark.native
def test_encoder_attention_ignores_padding_keys():
    from lattice_engine import kernels
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, 13, 5, 24)).astype(np.float32) for _ in range(3))
    lengths = np.array([13, 1, 7])
    got = kernels.encoder_attention(q, k, v, lengths, 0.2)
    # padding keys are never attended: changing them changes nothing
    k2, v2 = k.copy(), v.copy()
    k2[2, 7:] = 1e3
    v2[2, 7:] = -1e3
    assert np.array_equal(kernels.encoder_attention(q, k2, v2, lengths, 0.2)[2, :7], got[2, :7])
    with pytest.raises(ValueError, match="lengths"):
        kernels.encoder_attention(q, k, v, np.array([13, 0, 7]), 0.2)
