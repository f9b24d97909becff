"""Architectures by HF `model_type`, one module each; found through the plugin registry."""

from __future__ import annotations

from ..errors import CheckpointError

BUILTIN_ARCHITECTURES = {
    "bert": "lattice_engine.models.bert",  # encoders: embeddings only (contract.Encoder)
    "llama": "lattice_engine.models.llama",
    "qwen2": "lattice_engine.models.qwen2",
    "qwen3": "lattice_engine.models.qwen3",
    "qwen3_moe": "lattice_engine.models.qwen3_moe",
    "qwen3_5": "lattice_engine.models.qwen3_5",  # Qwen3_5ForConditionalGeneration
    "qwen3_5_text": "lattice_engine.models.qwen3_5",  # Qwen3_5ForCausalLM
    "qwen3_5_moe": "lattice_engine.models.qwen3_5_moe",  # Qwen3_5MoeForConditionalGeneration
    "qwen3_5_moe_text": "lattice_engine.models.qwen3_5_moe",  # Qwen3_5MoeForCausalLM
}


def model_class_for(config: dict, architectures: dict[str, type]) -> type:
    """The registered class for config["model_type"], or an error listing the known ones."""
    model_type = config.get("model_type")
    # a list or object is unhashable: check the type before the lookup
    if not isinstance(model_type, str) or model_type not in architectures:
        known = ", ".join(sorted(architectures))
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {known} "
                              f"(an installed plugin can add more: see `lattice plugins`)")
    return architectures[model_type]
