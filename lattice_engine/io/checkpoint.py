"""The in-memory description of a checkpoint that every reader produces.

Readers (HF folder, GGUF) differ in layout, but hand the model code the same thing:
an HF-style config dict, tensors under HF names, and the tokenizer with its chat template.
Tensors stay lazy (memory-mapped) until a model asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np


@dataclass(frozen=True)
class PackedTensor:
    """A tensor kept in a block-quantized weight format instead of floats.

    `data` is a uint8 array of shape [rows, row_bytes] laid out as the weight format
    `format` defines (e.g. GGUF Q8_0 blocks); `shape` is the logical float shape.
    """

    format: str
    shape: tuple[int, ...]
    data: np.ndarray


Tensor = "np.ndarray | PackedTensor"


@dataclass
class Checkpoint:
    """Everything a model and its tokenizer need, independent of the file format.

    Attributes:
        config: the HF `config.json` dict (for GGUF, rebuilt from its metadata).
        tensors: HF tensor name -> zero-argument loader returning an ndarray (float16,
            bfloat16-as-float32, float32) or a `PackedTensor`. Loaders are lazy so a
            memory-mapped file is only touched for tensors the model uses.
        shapes: HF tensor name -> logical shape, known without loading the tensor.
        tokenizer: a `tokenizers.Tokenizer`, or None when the checkpoint has none.
        tokenizer_config: the `tokenizer_config.json` dict (chat_template, special tokens).
        generation_config: the `generation_config.json` dict (may be empty).
        source: where it came from, for messages.
        stored_types: for a GGUF file, HF tensor name -> its ggml type id in the file (what
            `loading.load` reads to load the file as stored); empty for other formats.
    """

    config: dict[str, Any]
    tensors: Mapping[str, Callable[[], Any]]
    shapes: Mapping[str, tuple[int, ...]]
    tokenizer: Any = None
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    stored_types: Mapping[str, int] = field(default_factory=dict)
