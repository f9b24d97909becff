"""Structured output with xgrammar on tiny random-weight models: tokenizer info (vocab type,
added and special tokens, padded vocab), bitmask masking, the batch API with mixed
constrained and unconstrained rows, rollback, invalid grammars, Engine and CLI."""

import json
import re

import numpy as np
import pytest

from grammar_support import require_xgrammar_or_skip

require_xgrammar_or_skip()

import jsonschema  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, \
    pre_tokenizers  # noqa: E402

from conftest import byte_level_tokenizer, fixture_with_tokenizer  # noqa: E402
from lattice_engine.cli import main  # noqa: E402
from lattice_engine.engine import Engine  # noqa: E402
from lattice_engine.errors import RequestError  # noqa: E402
from lattice_engine.grammar import (GrammarCompiler, GrammarSpec, accept_batch,  # noqa: E402
                                    allocate_bitmask, apply_batch_bitmask, apply_bitmask,
                                    detect_vocab_type, grammar_from_request, tokenizer_parts)
from lattice_engine.tokenizer import TextTokenizer  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tag": {"enum": ["red", "green", "blue"]},
                         "ok": {"type": "boolean"}},
          "required": ["id", "tag", "ok"]}
REGEX = r"[a-c]{2,4}-[0-9]{3}"
EBNF = 'root ::= "(" item ("," item){0,2} ")"\nitem ::= [xyz] | "nil"'


def text_tokenizer(backend, eos=()):
    return TextTokenizer(backend, {}, {"eos_token_id": list(eos)}, {})


def allowed(matcher, vocab):
    row = np.zeros(vocab, dtype=np.float32)
    matcher.apply(row)
    return set(np.flatnonzero(np.isfinite(row)).tolist())


def byte_text(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# --- tokenizer info ------------------------------------------------------------------------

def test_byte_level_tokenizer_with_added_and_special_tokens():
    backend = byte_level_tokenizer()
    backend.add_tokens([AddedToken("héllo wörld", special=False, normalized=False)])
    backend.add_special_tokens([AddedToken("<|ctl|>", special=True)])
    tok = text_tokenizer(backend, eos=[0])
    compiler = GrammarCompiler(tok, 258)
    assert compiler.vocab_type == "BYTE_LEVEL"
    decoded = compiler.info.decoded_vocab
    assert decoded[ord("A")] == b"A" and decoded[ord(" ")] == b" " and decoded[10] == b"\n"
    assert decoded[256] == "héllo wörld".encode()  # literal content, spelled back exactly
    matcher = compiler.matcher(GrammarSpec.json_schema({"type": "string"}))
    matcher.accept(ord('"'))
    inside = allowed(matcher, 258)
    assert 256 in inside          # the user-defined token is text
    assert 257 not in inside      # the control token never is, even inside a free string
    assert 0 not in inside        # nor the stop token before the string is closed


def test_byte_fallback_vocab_is_detected_and_decoded():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁hello": 259, "▁": 260, "h": 261}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok = text_tokenizer(backend, eos=[2])
    assert detect_vocab_type(tokenizer_parts(backend), vocab) == ("BYTE_FALLBACK", True)
    compiler = GrammarCompiler(tok, len(vocab))
    decoded = compiler.info.decoded_vocab
    assert decoded[3 + 0x41] == b"A" and decoded[259] == b" hello"
    assert compiler.info.add_prefix_space


def test_vocab_without_byte_decoder_is_raw():
    backend = Tokenizer(models.WordLevel({"yes": 0, "no": 1, "<eos>": 2}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = backend.get_vocab()
    assert detect_vocab_type(tokenizer_parts(backend), vocab) == ("RAW", False)
    compiler = GrammarCompiler(text_tokenizer(backend, eos=[2]), 3)
    matcher = compiler.matcher(GrammarSpec.regex("yes|no"))
    assert allowed(matcher, 3) == {0, 1}
    matcher.accept(1)
    assert allowed(matcher, 3) == {2}


def test_model_vocab_larger_than_tokenizer_never_allows_the_padding():
    tok = text_tokenizer(byte_level_tokenizer(), eos=[0])
    compiler = GrammarCompiler(tok, 256 + 64)  # an lm_head padded past the tokenizer
    matcher = compiler.matcher(GrammarSpec.json_schema({"type": "string"}))
    matcher.accept(ord('"'))
    ids = allowed(matcher, 320)
    assert ord("a") in ids and not any(i >= 256 for i in ids)
    # and a model vocab smaller than the tokenizer's drops the ids it cannot produce
    backend = byte_level_tokenizer()
    backend.add_tokens([AddedToken("extra", special=False, normalized=False)])
    assert GrammarCompiler(text_tokenizer(backend, eos=[0]), 256).info.vocab_size == 256


# --- masking -------------------------------------------------------------------------------

def test_apply_bitmask_matches_a_bit_by_bit_loop():
    rng = np.random.default_rng(0)
    vocab = 1000  # not a multiple of 32: the last word is partial
    bitmask = rng.integers(-2**31, 2**31, size=(3, (vocab + 31) // 32)).astype(np.int32)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    expected = logits.copy()
    for r in range(3):
        for t in range(vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = -np.inf
    batch = logits.copy()
    apply_bitmask(batch, bitmask)
    np.testing.assert_array_equal(batch, expected)
    row = logits[1].copy()
    apply_bitmask(row, bitmask[1])
    np.testing.assert_array_equal(row, expected[1])


def test_rollback_restores_the_mask():
    compiler = GrammarCompiler(text_tokenizer(byte_level_tokenizer(), eos=[0]), 256)
    matcher = compiler.matcher(GrammarSpec.regex(REGEX))
    matcher.accept(ord("a"))
    before = allowed(matcher, 256)
    matcher.accept(ord("b"))
    matcher.accept(ord("-"))
    assert allowed(matcher, 256) != before
    matcher.rollback(2)
    assert allowed(matcher, 256) == before
    with pytest.raises(ValueError, match="only 1 accepted"):
        matcher.rollback(2)
    with pytest.raises(RequestError, match="does not continue the grammar"):
        matcher.accept(ord("z"))


def test_a_terminated_matcher_allows_only_stop_tokens():
    compiler = GrammarCompiler(text_tokenizer(byte_level_tokenizer(), eos=[0]), 256)
    matcher = compiler.matcher(GrammarSpec.regex("ab"))
    for token in (ord("a"), ord("b"), 0):
        assert token in allowed(matcher, 256)
        matcher.accept(token)
    assert matcher.is_terminated()
    assert allowed(matcher, 256) == {0}     # a caller ignoring EOS can only repeat it
    matcher.accept(0)                        # and that is accepted as a no-op
    with pytest.raises(RequestError, match="does not continue the grammar"):
        matcher.accept(ord("a"))
    free = compiler.matcher(GrammarSpec.regex("a+"))
    logits = np.zeros((2, 256), dtype=np.float32)
    assert apply_batch_bitmask([matcher, free], logits) == [0, 1]
    assert set(np.flatnonzero(np.isfinite(logits[0]))) == {0}
    assert set(np.flatnonzero(np.isfinite(logits[1]))) == {ord("a")}
    # a tokenizer without an end token: the sequence must stop when the grammar completes
    bare = GrammarCompiler(text_tokenizer(byte_level_tokenizer()), 256).matcher(
        GrammarSpec.regex("a"))
    bare.accept(ord("a"))
    assert bare.is_terminated()
    with pytest.raises(RequestError, match="must end here"):
        bare.apply(np.zeros(256, dtype=np.float32))


def test_mixed_batch_masks_each_row_by_its_own_grammar():
    """Rows 0 and 2 constrained (regex, JSON schema), rows 1 and 3 free: every step masks
    in one call, the free rows' logits are untouched, each row ends as its grammar says."""
    vocab = 256
    compiler = GrammarCompiler(text_tokenizer(byte_level_tokenizer(), eos=[0]), vocab)
    matchers = [compiler.matcher(GrammarSpec.regex(REGEX)), None,
                compiler.matcher(GrammarSpec.json_schema(SCHEMA)), None]
    rng = np.random.default_rng(1)
    outputs = [[] for _ in matchers]
    done = [False] * len(matchers)
    bitmask = allocate_bitmask(len(matchers), vocab)
    for _ in range(80):
        logits = rng.standard_normal((len(matchers), vocab)).astype(np.float32) * 3
        raw = logits.copy()
        active = [m if not d else None for m, d in zip(matchers, done)]
        rows = apply_batch_bitmask(active, logits, bitmask)
        assert rows == [i for i, m in enumerate(active) if m is not None]
        for i, m in enumerate(active):
            if m is None:
                np.testing.assert_array_equal(logits[i], raw[i])   # free rows untouched
            else:  # the batch call masked exactly what the row's own matcher allows
                np.testing.assert_array_equal(np.isfinite(logits[i]), np.isin(
                    np.arange(vocab), sorted(allowed(m, vocab))))
        tokens = logits.argmax(axis=1).tolist()
        accept_batch(active, tokens)
        for i, token in enumerate(tokens):
            if not done[i]:
                outputs[i].append(token)
                done[i] = matchers[i] is not None and matchers[i].is_terminated()
    assert done[0] and done[2]
    assert outputs[0][-1] == 0 and outputs[2][-1] == 0  # each ended with the stop token
    assert re.fullmatch(REGEX, byte_text(outputs[0][:-1]))
    jsonschema.validate(json.loads(byte_text(outputs[2][:-1])), SCHEMA)
    assert len(outputs[1]) == 80 and len(outputs[3]) == 80  # free rows ran on


# --- invalid input -------------------------------------------------------------------------

@pytest.mark.parametrize("body, words", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "banana"}}}},
     'invalid JSON schema: Unsupported type "banana"'),
    ({"regex": "a(b"}, "invalid regex: Regex parsing error at position 4: The parenthesis is "
                       "not closed"),
    ({"grammar": "root ::= foo"}, 'invalid EBNF grammar: .*Rule "foo" is not defined'),
    ({"grammar": 'start ::= "a"'}, 'The root rule with name "root" is not found'),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]+$",
                                                 "maxLength": 5}}}}}},
     "at /properties/zip, 'pattern' together with 'maxLength' cannot be enforced"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"not": {"type": "array", "uniqueItems": True}}}}}},
     "at /properties/not, 'uniqueItems' cannot be enforced"),
])
def test_invalid_schema_or_grammar_carries_xgrammars_message(body, words):
    compiler = GrammarCompiler(text_tokenizer(byte_level_tokenizer(), eos=[0]), 256)
    with pytest.raises(RequestError, match=words) as info:
        grammar_from_request(body, compiler)
    message = str(info.value)
    assert message.startswith("invalid ")
    assert ".cc:" not in message and "Check failed" not in message  # xgrammar's prefix


# --- through the Engine and the CLI --------------------------------------------------------

@pytest.fixture(params=[0, 256], ids=["eos-in-vocab", "no-eos"])
def engine(request, tmp_path):
    # eos 256 lies outside the 256-token vocab: the matcher then ends itself on completion
    folder = fixture_with_tokenizer("llama", tmp_path, eos_token_id=request.param)
    return Engine.load(str(folder), backend="numpy")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_outputs_follow_regex_ebnf_and_schema(engine, temperature):
    opts = dict(temperature=temperature, seed=3, max_tokens=64)
    result = engine.generate("abc", regex=REGEX, **opts)
    assert re.fullmatch(REGEX, result.text) and result.finish_reason == "stop"
    result = engine.generate("abc", grammar=EBNF, **opts)
    assert re.fullmatch(r"\(([xyz]|nil)(,([xyz]|nil)){0,2}\)", result.text)
    assert result.finish_reason == "stop"
    result = engine.generate("abc", response_format={
        "type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}, **opts)
    jsonschema.validate(json.loads(result.text), SCHEMA)
    chunks = list(engine.stream("abc", regex=REGEX, **opts))
    assert "".join(c.text for c in chunks) == engine.generate("abc", regex=REGEX, **opts).text
    assert chunks[-1].finish_reason == "stop"


def test_engine_request_grammar_is_the_server_seam(engine):
    assert engine.request_grammar({"model": "x", "prompt": "hi"}) is None
    spec = engine.request_grammar({"response_format": {"type": "json_object"}})
    assert spec == GrammarSpec.json_object()
    result = engine.generate("abc", grammar=spec, max_tokens=48, temperature=1.0, seed=0)
    assert result.text.startswith("{")
    with pytest.raises(RequestError, match="invalid JSON schema: Unsupported type"):
        engine.request_grammar({"response_format": {
            "type": "json_schema", "json_schema": {"schema": {"type": "banana"}}}})


def test_engine_rejects_an_invalid_grammar_and_keeps_working(engine):
    with pytest.raises(RequestError, match="invalid regex"):
        engine.stream("abc", regex="(((")   # raised before any token is generated
    assert engine.generate("abc", max_tokens=5).finish_reason == "length"
    assert re.fullmatch(REGEX, engine.generate("abc", regex=REGEX, max_tokens=32).text)


def test_cli_generate_with_regex_and_grammar(tmp_path, capsys):
    folder = fixture_with_tokenizer("llama", tmp_path, eos_token_id=0)
    base = ["generate", "abc", "--model", str(folder), "--backend", "numpy", "--raw", "--json",
            "--temperature", "0", "--max-tokens", "48"]
    assert main(base + ["--regex", REGEX]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert re.fullmatch(REGEX, out["text"]) and out["finish_reason"] == "stop"
    grammar = tmp_path / "g.ebnf"
    grammar.write_text(EBNF)
    assert main(base + ["--grammar", str(grammar)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert re.fullmatch(r"\(([xyz]|nil)(,([xyz]|nil)){0,2}\)", out["text"])
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(base + ["--json-schema", str(schema)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert main(base + ["--regex", "a(b"]) == 2
    assert "invalid regex" in capsys.readouterr().err
