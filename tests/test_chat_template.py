"""Chat templates render with transformers' Jinja conventions."""

import pytest

from conftest import CHATML
from lattice_engine.chat_template import TemplateError, render_chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_chatml_rendering():
    text = render_chat({"chat_template": CHATML}, MESSAGES)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_trim_and_lstrip_blocks_and_special_tokens():
    template = """{{ bos_token }}
    {%- for m in messages %}
        {% if m.role == 'user' %}[U] {{ m.content }}{% endif %}
    {% endfor %}"""
    text = render_chat({"chat_template": template, "bos_token": {"content": "<s>"}}, MESSAGES)
    assert text == "<s>[U] Hi"


def test_raise_exception_becomes_a_request_error():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(TemplateError, match="user first"):
        render_chat({"chat_template": template}, MESSAGES)


def test_tojson_keeps_unicode():
    text = render_chat({"chat_template": "{{ messages[0] | tojson }}"},
                       [{"role": "user", "content": "héllo"}])
    assert text == '{"role": "user", "content": "héllo"}'


def test_missing_template_falls_back_to_chatml():
    assert render_chat({}, MESSAGES) == render_chat({"chat_template": CHATML}, MESSAGES)


def test_sandbox_blocks_attribute_escape():
    with pytest.raises(TemplateError):
        render_chat({"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, MESSAGES)
