"""lattice-lora: LoRA adapters for lattice-engine (the "lora" adapter kind).

PEFT folders in and out (`load_peft`, `save_peft_safetensors`), applied unmerged per
request by the core (`lattice_engine.adapters`), and trained online (`adapt_step`)."""

from .peft_io import LORA, LoraKind, load_peft, save_peft_safetensors
from .train import OptimizerSettings, StepResult, TrainState, adapt_step, loss_and_grads

__all__ = ["LORA", "LoraKind", "load_peft", "save_peft_safetensors", "OptimizerSettings",
           "StepResult", "TrainState", "adapt_step", "loss_and_grads"]
__version__ = "0.1.0"
