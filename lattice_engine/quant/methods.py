"""Quant methods: which weight format each tensor of a model is stored in.

A model names the role of every matrix it loads ("embedding", "linear", "lm_head"); the
method maps (role, tensor name, shape) to a registered weight format. Per-tensor overrides
from the config (`[quant.overrides]`, glob pattern -> format) win over the method.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Mapping, Optional

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

    def with_group_size(self, group_size: Optional[int]) -> "QuantMethod":
        """This method at `[quant] group_size`; methods without groups refuse one.
        Plugins with grouped formats (lattice-quant-q4) override this."""
        if group_size is None:
            return self
        raise ConfigError(f"quant.group_size = {group_size!r} does not apply to quant method "
                          f"{self.name!r}, which has no group size; remove it or pick a "
                          f"grouped method (q4_sym, q4_asym from lattice-quant-q4)")


@dataclass(frozen=True)
class QuantSpec:
    """What the config asked for: a method name and per-tensor overrides."""

    method: Optional[str] = None  # None: as the checkpoint is stored (f32 if it is not quantized)
    overrides: Mapping[str, str] = field(default_factory=dict)
    group_size: Optional[int] = None


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

# Methods that installable plugins provide: named in the error when one is asked for but
# its plugin is missing.
PLUGIN_METHODS = {"q4_sym": "lattice-quant-q4", "q4_asym": "lattice-quant-q4"}
PLUGIN_INSTALL = {"lattice-quant-q4": "pip install ./plugins/quant_q4"}


def missing_method_hint(name: str) -> str:
    """' ...; it is provided by X (install: ...)' for a known plugin method, else ''."""
    dist = PLUGIN_METHODS.get(name)
    if dist is None:
        return ""
    return (f"; {name!r} is provided by the plugin package {dist}, which is not installed "
            f"or not loaded (install it with `{PLUGIN_INSTALL[dist]}` from the lattice-engine "
            f"source tree, and check LATTICE_PLUGINS / [plugins] load)")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown tensor role {role!r}; valid roles: {', '.join(ROLES)}")
