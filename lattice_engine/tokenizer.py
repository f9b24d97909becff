"""Text <-> token ids for a checkpoint, plus its chat template and stop tokens."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .chat_template import render_chat
from .errors import CheckpointError


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
        bos = tokenizer_config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_token_id = tokenizer.token_to_id(bos) if bos else None

    def _eos_ids(self, tok_cfg, gen_cfg, model_cfg) -> tuple[int, ...]:
        ids: list[int] = []
        for source in (gen_cfg.get("eos_token_id"), model_cfg.get("eos_token_id")):
            if isinstance(source, int):
                ids.append(source)
            elif isinstance(source, list):
                ids.extend(int(i) for i in source)
        eos = tok_cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
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
