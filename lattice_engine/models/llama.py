"""Llama (and SmolLM2, Mistral-style) decoders: the standard block with no extras."""

from .transformer import DecoderConfig, DecoderModel


class ModelArgs(DecoderConfig):
    pass


class Model(DecoderModel):
    config_class = ModelArgs
