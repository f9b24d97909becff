"""Checkpoint readers: HF folders of safetensors, GGUF files, and the model catalog."""
