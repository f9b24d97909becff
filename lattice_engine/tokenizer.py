"""Text <-> token ids for a checkpoint, plus its chat template and stop tokens."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .chat_template import render_chat
from .errors import CheckpointError


def _token_text(value) -> Optional[str]:
    """A special token as written in tokenizer_config.json: a string, or {"content": str};
    anything else (a number, a list) names no token."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer` with the checkpoint's special-token conventions."""

    def __init__(self, tokenizer, tokenizer_config: dict[str, Any],
                 generation_config: dict[str, Any], model_config: dict[str, Any]):
        if tokenizer is None:
            raise CheckpointError("the checkpoint has no tokenizer (tokenizer.json, or GGUF "
                                  "tokenizer metadata); add one to the model folder")
        self.tokenizer = tokenizer
        self.config = tokenizer_config
        self.eos_token_ids = self._eos_ids(tokenizer_config, generation_config, model_config)
        bos = _token_text(tokenizer_config.get("bos_token"))
        self.bos_token_id = tokenizer.token_to_id(bos) if bos else None

    def _eos_ids(self, tok_cfg, gen_cfg, model_cfg) -> tuple[int, ...]:
        ids: list[int] = []
        for where, source in (("generation_config.json", gen_cfg.get("eos_token_id")),
                              ("config.json", model_cfg.get("eos_token_id"))):
            items = source if isinstance(source, list) else [source]
            if source is None:
                continue
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                raise CheckpointError(f"{where}: eos_token_id = {repr(source)[:80]} must be "
                                      f"an integer or a list of integers")
            ids.extend(items)
        eos = _token_text(tok_cfg.get("eos_token"))
        if eos and self.tokenizer.token_to_id(eos) is not None:
            ids.append(self.tokenizer.token_to_id(eos))
        return tuple(dict.fromkeys(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra) -> list[int]:
        """Token ids of the rendered chat; the template carries its own special tokens."""
        text = render_chat(self.config, messages, add_generation_prompt=add_generation_prompt,
                           **extra)
        return self.encode(text, add_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.config, messages, add_generation_prompt=add_generation_prompt)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> Optional[str]:
        return self.tokenizer.id_to_token(token_id)
