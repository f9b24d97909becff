"""Quant methods: which weight format each tensor of a model is stored in.

A model names the role of every matrix it loads ("embedding", "linear", "lm_head"); the
method maps (role, tensor name, shape) to a registered weight format. Per-tensor overrides
from the config (`[quant.overrides]`, glob pattern -> format) win over the method.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import ConfigError

ROLES = ("embedding", "linear", "lm_head", "tied_embedding")


@dataclass(frozen=True)
class QuantMethod:
    """A named choice of formats by role.

    Attributes:
        name: registry key, `[quant] method = NAME`.
        linear: format for linear-layer weights.
        embedding: format for the token embedding table when it is only looked up.
        lm_head: format for an untied output projection.
        tied_embedding: format for an embedding table that is also the lm_head. Lattice
            v0.2.3 keeps it f16: a per-row q8 lm_head sharpens the logits measurably.
        fallback: format used when a matrix's row length does not fit `linear`'s blocks.
        description: one line for `lattice plugins` and error messages.
    """

    name: str
    linear: str
    embedding: str = "f16"
    lm_head: str = "f16"
    tied_embedding: str = "f16"
    fallback: str = "f16"
    description: str = ""

    def format_for(self, role: str, tensor_name: str, cols: int, block_size_of,
                   overrides: Mapping[str, str] = {}) -> str:
        for pattern, fmt in overrides.items():
            if fnmatch.fnmatchcase(tensor_name, pattern):
                return fmt
        fmt = {"embedding": self.embedding, "linear": self.linear, "lm_head": self.lm_head,
               "tied_embedding": self.tied_embedding}[role]
        if cols % block_size_of(fmt):
            return self.fallback
        return fmt


@dataclass(frozen=True)
class QuantSpec:
    """What the config asked for: a method name and per-tensor overrides."""

    method: str = "f32"
    overrides: Mapping[str, str] = field(default_factory=dict)


F32_METHOD = QuantMethod("f32", linear="f32", embedding="f32", lm_head="f32",
                         tied_embedding="f32", fallback="f32",
                         description="float32 everywhere (the reference)")
F16_METHOD = QuantMethod("f16", linear="f16", embedding="f16", lm_head="f16",
                         description="float16 weights, float32 compute")
Q8_0_METHOD = QuantMethod("q8_0", linear="q8_0", embedding="q8_0", lm_head="q8_0",
                          tied_embedding="f16",
                          description="GGUF-compatible Q8_0 weights; a tied embedding / "
                                      "lm_head stays f16")

CORE_METHODS = (F32_METHOD, F16_METHOD, Q8_0_METHOD)


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown tensor role {role!r}; valid roles: {', '.join(ROLES)}")
