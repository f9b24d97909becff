"""Check by hand that lattice renders chat templates exactly as transformers does.

    python scripts/check_chat_templates.py [smollm2-135m qwen2.5-coder-0.5b ...]

For each catalog model (or .gguf path), renders several conversations with lattice and with
transformers' `apply_chat_template` (tokenizer loaded from the same GGUF) and compares the
text and the token ids. Needs transformers; not part of the test suite.
"""

from __future__ import annotations

import sys

from lattice_engine.io.catalog import resolve
from lattice_engine.io.gguf_reader import load_gguf
from lattice_engine.tokenizer import TextTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi there — ünïcode?"},
     {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "List 3 primes."}],
]


def main(names: list[str]) -> int:
    from transformers import AutoTokenizer

    failures = 0
    for name in names or ["smollm2-135m", "qwen2.5-coder-0.5b"]:
        path = resolve(name)
        ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        ckpt = load_gguf(path)
        ours = TextTokenizer(ckpt.tokenizer, ckpt.tokenizer_config, ckpt.generation_config,
                             ckpt.config)
        for messages in CONVERSATIONS:
            text_ok = ours.render_chat(messages) == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
            ids_ok = ours.apply_chat_template(messages) == ref.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            failures += not (text_ok and ids_ok)
            print(f"{name}: {len(messages)} messages: text {'same' if text_ok else 'DIFFERS'}, "
                  f"ids {'same' if ids_ok else 'DIFFER'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
