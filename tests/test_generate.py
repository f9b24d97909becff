"""Generation on a tiny checkpoint with a byte-level tokenizer: streaming, stops, limits."""

import numpy as np
import pytest

from conftest import fixture_with_tokenizer
from lattice_engine.engine import Engine
from lattice_engine.text_stream import StopMatcher
from lattice_engine.errors import RequestError
from lattice_engine.sampling import SamplingParams


@pytest.fixture
def engine(tmp_path):
    # eos id 256 does not exist in the 256-token vocab, so generation runs to max_tokens
    folder = fixture_with_tokenizer("qwen3", tmp_path, eos_token_id=256)
    return Engine.load(str(folder), backend="numpy",
                       sampling=SamplingParams(temperature=0, max_tokens=24))


def test_stream_concatenates_to_generate(engine):
    result = engine.generate("abc")
    chunks = list(engine.stream("abc"))
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.tokens] == result.tokens
    assert chunks[-1].finish_reason == "length" == result.finish_reason
    assert len(result.tokens) == 24


def test_greedy_tokens_match_manual_argmax_loop(engine):
    ids = engine.tokenizer.encode("abc")
    model = engine.model
    cache = model.make_cache()
    logits = model.forward(np.array([ids]), cache, last_only=True)
    expected = []
    for _ in range(10):
        token = int(logits[0, -1].argmax())
        expected.append(token)
        logits = model.forward(np.array([[token]]), cache, last_only=True)
    assert engine.generate("abc", max_tokens=10).tokens == expected


def test_stop_token_ends_generation_without_emitting_it(engine):
    full = engine.generate("abc").tokens
    stop = full[5]
    result = engine.generate("abc", stop_token_ids=[stop])
    assert result.finish_reason == "stop"
    assert result.tokens == full[: full.index(stop)]


def test_stop_string_cuts_text_before_it(engine):
    full = engine.generate("abc").text
    assert len(full) > 8
    stop = full[4:7]
    result = engine.generate("abc", stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert stop not in "".join(c.text for c in engine.stream("abc", stop=[stop]))


def test_stop_token_releases_text_held_back_for_a_stop_string(engine):
    # seeded sampling: the same tokens again, so the run can stop at a chosen token
    sample = dict(temperature=1.0, seed=5)
    tokens = engine.generate("abc", **sample).tokens
    k = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i]
             and not engine.tokenizer.decode(tokens[:i]).endswith("\ufffd"))
    before = engine.tokenizer.decode(tokens[:k])
    never = before[-1] + "\u2603 never generated"  # its first character is held back
    stops = dict(stop_token_ids=[tokens[k]], stop=[never], **sample)
    result = engine.generate("abc", **stops)
    assert result.finish_reason == "stop"
    assert result.text == before
    assert "".join(c.text for c in engine.stream("abc", **stops)) == before


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate("abc", temperature=1.0, seed=11).tokens
    b = engine.generate("abc", temperature=1.0, seed=11).tokens
    c = engine.generate("abc", temperature=1.0, seed=12).tokens
    assert a == b and a != c


def test_chat_uses_the_template(engine):
    ids = engine.prompt_ids(messages=[{"role": "user", "content": "hi"}])
    assert engine.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert len(engine.chat([{"role": "user", "content": "hi"}], max_tokens=3).tokens) == 3


def test_empty_and_too_long_prompts_are_request_errors(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.generate([])
    with pytest.raises(RequestError, match="context is 256"):
        engine.generate([1] * 300)
    with pytest.raises(RequestError, match="unknown sampling option"):
        engine.generate("abc", temprature=0.3)


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["END"])
    assert m.split("abcEN", final=False) == ("abc", "EN", False)
    assert m.split("abcENX", final=False) == ("abcE", "NX", False)
    assert m.split("abcEND tail", final=False) == ("abc", None, True)
    assert m.split("abcEN", final=True) == ("abcEN", "", False)


def test_cli_generate_takes_openai_penalties_and_logit_bias(tiny_model_dir, capsys):
    """`lattice generate --logit-bias ID=BIAS` forces a token; the penalty flags reach the
    sampling options (a bad value is a one-line error naming the flag's field)."""
    import json

    from lattice_engine.cli import main
    from lattice_engine.engine import Engine
    tok = Engine.load(str(tiny_model_dir)).tokenizer
    forced = tok.encode("q", add_special_tokens=False)[0]
    assert main(["generate", "-m", str(tiny_model_dir), "ab", "--raw", "--max-tokens", "4",
                 "--temperature", "0", "--logit-bias", f"{forced}=100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == tok.decode([forced] * 4)
    assert main(["generate", "-m", str(tiny_model_dir), "ab", "--raw", "--max-tokens", "4",
                 "--presence-penalty", "1.5", "--frequency-penalty", "-1", "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", "-m", str(tiny_model_dir), "ab", "--raw", "--presence-penalty", "3"]) == 2
    assert "presence_penalty=3.0" in capsys.readouterr().err
    assert main(["generate", "-m", str(tiny_model_dir), "ab", "--raw", "--logit-bias", "x=1"]) == 2
    assert "--logit-bias 'x=1'" in capsys.readouterr().err
