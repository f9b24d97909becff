from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def native_available() -> bool:
    try:
        from lattice_engine import kernels
        return kernels.available()
    except ImportError:
        return False


BACKENDS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(
    not native_available(), reason="the native kernels are not built"))]


SPECIAL_TOKENS = {248: "<|vision_start|>", 249: "<|vision_end|>", 250: "<|image_pad|>",
                  251: "<|video_pad|>", 252: "<|im_start|>", 253: "<|im_end|>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vision_tokenizer():
    """Byte-level (id == byte value) over the fixtures' 256-token vocabulary, with the
    Qwen-VL special tokens at ids 248..253: bytes that never occur in UTF-8 text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from lattice_engine.testing.checkpoints import _bytes_to_unicode
    chars = _bytes_to_unicode()
    vocab = {SPECIAL_TOKENS.get(b, chars[b]): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS.values()])
    return tok


def vision_model_folder(folder: Path, name: str) -> Path:
    """A copy of fixture `name` with the tokenizer files a chat needs."""
    import json
    import shutil
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(FIXTURES / name / f, folder / f)
    vision_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 253}))
    return folder


def image_message(png: bytes, text: str = "What is in this picture?") -> list:
    import base64
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": text}]}]
