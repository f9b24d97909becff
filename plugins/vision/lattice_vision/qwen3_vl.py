"""Qwen3-VL's text model (`Qwen3VLForConditionalGeneration`, model_type "qwen3_vl"): the
Qwen3 decoder (q/k RMSNorm) under `model.language_model.*`, with interleaved M-RoPE and
deepstack (the vision tower's features of early blocks added to the image rows after the
first decoder layers). Text-only prompts run exactly the Qwen3 forward."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from lattice_engine.cache.dense import KVCache
from lattice_engine.models.base import check_tokens
from lattice_engine.models.transformer import DecoderConfig, DecoderModel
from lattice_engine.multimodal import (ForwardInputs, check_forward_inputs, mrope_axes,
                                       mrope_tables)


class TextConfig(DecoderConfig):
    """`text_config` of a Qwen3-VL checkpoint; `mrope_section` from its rope_parameters."""

    @property
    def mrope_section(self) -> Optional[list]:
        return (self.rope_parameters or {}).get("mrope_section")


class LanguageModelWeights:
    """The loader seen through the composite checkpoint's names: `model.X` is read from
    `model.language_model.X` (lm_head.weight stays)."""

    def __init__(self, loader):
        self.loader = loader
        self.checkpoint = loader.checkpoint

    @staticmethod
    def rename(name: str) -> str:
        return "model.language_model." + name[len("model."):] if name.startswith("model.") \
            else name

    def has(self, name: str) -> bool:
        return self.loader.has(self.rename(name))

    def vector(self, name, shape):
        return self.loader.vector(self.rename(name), shape)

    def matrix(self, name, shape, role):
        return self.loader.matrix(self.rename(name), shape, role)


class Model(DecoderModel):
    config_class = TextConfig
    qk_norm = True

    @classmethod
    def from_checkpoint(cls, checkpoint, loader, ops) -> "Model":
        config: dict[str, Any] = dict(checkpoint.config.get("text_config") or {})
        config.setdefault("tie_word_embeddings",
                          bool(checkpoint.config.get("tie_word_embeddings", False)))
        return cls(cls.config_class.from_dict(config), LanguageModelWeights(loader), ops)

    @property
    def mrope_axes(self) -> np.ndarray:
        section = self.config.mrope_section
        if section is None:
            return np.zeros(len(self.inv_freq), np.int64)
        return mrope_axes(len(self.inv_freq), section, True)  # Qwen3-VL always interleaves

    def rope_tables(self, positions: np.ndarray):
        if positions.ndim == 1:
            return self.ops.rope_tables(positions, self.inv_freq)
        return mrope_tables(positions, self.inv_freq, self.mrope_axes)

    def hidden_states(self, tokens: np.ndarray, cache: KVCache,
                      inputs: Optional[ForwardInputs] = None) -> np.ndarray:
        if inputs is None or (inputs.positions is None and not inputs.replaces):
            return super().hidden_states(tokens, cache)
        ops = self.ops
        tokens = check_tokens(tokens, self.config.vocab_size)
        check_forward_inputs(inputs, tokens.shape, self.config.hidden_size)
        t = tokens.shape[1]
        positions = inputs.positions if inputs.positions is not None else \
            np.arange(cache.offset, cache.offset + t)
        cos, sin = self.rope_tables(np.asarray(positions))
        if t == 1 and not inputs.replaces and type(cache) is KVCache and \
                self._decode_step() is not None:
            step = self._decode_step()
            cache.reserve(cache.offset + 1)
            if not step.is_bound_to(cache.keys, cache.values):
                step.bind_cache(cache.keys, cache.values)
            hidden = step(tokens[:, 0], cache.offset, cos, sin)
            cache.advance(1)
            return hidden[:, None, :]
        x = ops.embed(self.embed_tokens, tokens)
        if inputs.replaces:
            x = np.array(x, dtype=np.float32)
            x[0, inputs.rows] = inputs.embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, cos, sin, ops)
            if inputs.replaces and i < len(inputs.deepstack):
                x[0, inputs.rows] += inputs.deepstack[i]
        cache.advance(t)
        return ops.rms_norm(x, self.norm, self.config.rms_norm_eps)
