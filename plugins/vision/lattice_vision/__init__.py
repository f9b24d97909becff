"""lattice-vision: the Qwen3.5 / Qwen3-VL vision tower for lattice-engine (images in chat
prompts), its HF-equal preprocessing, and the `qwen3_vl` text architecture (M-RoPE and
deepstack)."""

__version__ = "0.1.0"
