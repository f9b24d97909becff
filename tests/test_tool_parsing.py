"""Tool-call parsing and tool request checks (no model): the Hermes `<tool_call>` blocks,
a bare or fenced call JSON, what streams before a call, and the forced call's schema."""

import json

import pytest

pytest.importorskip("starlette")

from lattice_engine.server.protocol import APIError  # noqa: E402
from lattice_engine.server.tools import (content_before_call, parse_calls,  # noqa: E402
                                         template_messages, tool_request)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop"}}]


def calls_of(text, choice="auto"):
    content, calls = parse_calls(text, tool_request({"tools": TOOLS, "tool_choice": choice}))
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in calls]


def test_hermes_blocks_become_calls_and_the_rest_stays_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
    assert calls_of(text) == ("Let me check.", [("get_weather", {"city": "Oslo"}),
                                                ("noop", {})])
    # an unknown tool or a broken body is not a call: the text stays as it was
    for bad in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                '<tool_call>{"name": "noop", "argu</tool_call>'):
        assert calls_of(bad) == (bad, [])
    # cut off before the closing tag (max_tokens) but the JSON is whole: still a call
    assert calls_of('<tool_call>\n{"name": "noop", "arguments": {}}')[1] == [("noop", {})]


def test_a_bare_or_fenced_call_json_is_a_call():
    for text in ('{"name": "get_weather", "arguments": {"city": "Rome"}}',
                 '```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```'):
        assert calls_of(text) == (None, [("get_weather", {"city": "Rome"})])
    plain = '{"city": "Rome"}'  # JSON, but not a call
    assert calls_of(plain) == (plain, [])
    extra = '{"name": "noop", "arguments": {}, "note": "x"}'
    assert calls_of(extra) == (extra, [])


def test_forced_output_is_the_call_body():
    assert calls_of('{"name": "noop", "arguments": {}}', "required") == (None, [("noop", {})])
    assert calls_of('{"name": "noop", "argum', "required")[1] == []  # cut short


def test_streaming_holds_back_what_may_start_a_call():
    assert content_before_call("Hello <tool") == ("Hello ", False)
    assert content_before_call("Hello <tool_call>\n{") == ("Hello ", True)
    assert content_before_call("Hello world") == ("Hello world", False)
    assert content_before_call('  {"name"') == ("", False)
    assert content_before_call("``") == ("", False)


def test_tool_requests_are_checked():
    named = tool_request({"tools": TOOLS, "tool_choice": {"type": "function",
                                                          "function": {"name": "noop"}}})
    assert named.constrained and named.schema()["properties"]["name"] == {"const": "noop"}
    required = tool_request({"tools": TOOLS, "tool_choice": "required"})
    assert [o["properties"]["name"]["const"] for o in required.schema()["anyOf"]] == \
        ["get_weather", "noop"]
    assert tool_request({"tools": TOOLS, "tool_choice": "none"}) is None
    assert tool_request({}) is None
    for body, words in [({"tool_choice": "required"}, "needs 'tools'"),
                        ({"tools": TOOLS, "tool_choice": "maybe"}, "'maybe'"),
                        ({"tools": TOOLS + TOOLS[:1]}, "given twice"),
                        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
                        ({"tools": TOOLS, "tool_choice": {"type": "function",
                                                          "function": {"name": "x"}}},
                         "not among the tools: get_weather, noop")]:
        with pytest.raises(APIError) as info:
            tool_request(body)
        assert words in info.value.message and info.value.status == 400


def test_assistant_tool_call_arguments_reach_templates_as_objects():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function",
         "function": {"name": "noop", "arguments": '{"a": 1}'}}]}]
    assert template_messages(messages)[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
