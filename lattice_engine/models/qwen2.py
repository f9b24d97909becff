"""Qwen2 / Qwen2.5: the standard block with bias on the q, k and v projections."""

from .transformer import DecoderConfig, DecoderModel


class ModelArgs(DecoderConfig):
    pass


class Model(DecoderModel):
    config_class = ModelArgs
    qkv_bias = True  # always present in Qwen2 checkpoints, whatever attention_bias says
