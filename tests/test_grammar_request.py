"""The request-level seam of structured output: field parsing (no xgrammar needed), the
error a missing grammar extra gives, and the CLI's constraint options."""

import json
import sys

import pytest

from lattice_engine.cli import main
from lattice_engine.errors import ConfigError, RequestError
from lattice_engine.grammar import INSTALL_HINT, GrammarSpec, grammar_from_request, \
    require_xgrammar

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


def test_no_constraint_fields_mean_no_grammar():
    assert grammar_from_request({}) is None
    assert grammar_from_request({"response_format": {"type": "text"}, "regex": None}) is None


def test_response_format_json_object_and_json_schema():
    assert grammar_from_request({"response_format": {"type": "json_object"}}) == \
        GrammarSpec("json_object")
    spec = grammar_from_request({"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}})
    assert spec.kind == "json_schema"
    assert json.loads(spec.source) == SCHEMA
    assert list(json.loads(spec.source)["properties"]) == ["b", "a"]  # order kept
    # OpenAI makes the schema optional: any JSON object then
    assert grammar_from_request({"response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}) == GrammarSpec("json_object")


def test_regex_and_ebnf_fields():
    assert grammar_from_request({"regex": "[a-z]+"}) == GrammarSpec("regex", "[a-z]+")
    assert grammar_from_request({"grammar": 'root ::= "a"'}) == GrammarSpec("ebnf", 'root ::= "a"')


@pytest.mark.parametrize("body, words", [
    ({"response_format": "json"}, "response_format must be an object"),
    ({"response_format": {"type": "xml"}}, "'xml' is not one of"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "schema must be a JSON schema object"),
    ({"regex": 5}, "regex must be a non-empty string"),
    ({"grammar": ""}, "grammar must be a non-empty string"),
    ({"regex": "a", "grammar": 'root ::= "a"'}, "at most one output constraint"),
    ({"response_format": {"type": "json_object"}, "regex": "a"}, "at most one"),
])
def test_malformed_fields_are_request_errors(body, words):
    with pytest.raises(RequestError, match=words):
        grammar_from_request(body)


def test_unknown_spec_kind_is_rejected():
    with pytest.raises(RequestError, match="not one of"):
        GrammarSpec("yaml", "x")


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # makes `import xgrammar` fail
    with pytest.raises(ConfigError) as info:
        require_xgrammar()
    assert INSTALL_HINT in str(info.value)
    assert INSTALL_HINT == 'pip install "lattice-engine[grammar]"'


def test_cli_constraint_options_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--regex", "a", "--grammar", "g.ebnf"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_bad_schema_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    assert main(["generate", "x", "--json-schema", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--json-schema" in err and "not valid JSON" in err and "Traceback" not in err
    assert main(["generate", "x", "--grammar", str(tmp_path / "missing.ebnf")]) == 2
    assert "cannot read it" in capsys.readouterr().err
