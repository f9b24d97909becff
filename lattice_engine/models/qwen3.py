"""Qwen3: the standard block with per-head RMSNorm on queries and keys before RoPE."""

from .transformer import DecoderConfig, DecoderModel


class ModelArgs(DecoderConfig):
    pass


class Model(DecoderModel):
    config_class = ModelArgs
    qk_norm = True
