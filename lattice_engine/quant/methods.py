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
            v0.2.3 kept it f16 because its per-row q8 lm_head sharpened the logits; q8_0's
            blocks of 32 cost +0.0014 perplexity over the f16 table on SmolLM2 (README, "The
            tied lm_head's format") and read half the bytes, so q8_0 uses them.
        fallback: format used when a matrix's row length does not fit `linear`'s blocks;
            a tuple of formats is tried in order (the first whose blocks fit wins, else the
            last).
        description: one line for `lattice plugins` and error messages.
    """

    name: str
    linear: str
    embedding: str = "f16"
    lm_head: str = "f16"
    tied_embedding: str = "f16"
    fallback: str | tuple[str, ...] = "f16"
    description: str = ""

    def format_for(self, role: str, tensor_name: str, cols: int, block_size_of,
                   overrides: Mapping[str, str] = {}) -> str:
        for pattern, fmt in overrides.items():
            if fnmatch.fnmatchcase(tensor_name, pattern):
                return fmt
        fmt = {"embedding": self.embedding, "linear": self.linear, "lm_head": self.lm_head,
               "tied_embedding": self.tied_embedding}[role]
        if cols % block_size_of(fmt) == 0:
            return fmt
        for fallback in self.fallbacks:
            if cols % block_size_of(fallback) == 0:
                return fallback
        return self.fallbacks[-1]

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """`fallback` as a tuple, in the order tried."""
        return tuple(self.fallback) if isinstance(self.fallback, (tuple, list)) else \
            (self.fallback,)

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
                          tied_embedding="q8_0",
                          description="GGUF-compatible Q8_0 weights, a tied embedding / "
                                      "lm_head included (override it to f16 to keep that "
                                      "table f16)")

# A GGUF file's matrices in their own block types wherever the core multiplies them (Q8_0,
# F16, F32, and a Q4_K_M file's Q4_K / Q5_0 / Q6_K), q8_0 for the others: what the file's
# values are, in the file's bytes (`loading.gguf_as_stored`). Only for GGUF files.
GGUF_METHOD = QuantMethod("gguf", linear="q8_0", embedding="q8_0", lm_head="q8_0",
                          tied_embedding="q8_0",
                          description="a GGUF file's blocks as stored (Q4_K, Q5_0, Q6_K, "
                                      "Q8_0, F16, F32), q8_0 for other block types")

CORE_METHODS = (F32_METHOD, F16_METHOD, Q8_0_METHOD, GGUF_METHOD)

# A plugin distribution names the quant methods it provides in this entry-point group
# (name = method, value = its plugin module), so a method asked for while its plugin is not
# loaded gets a hint from installed metadata, without importing anything and without the
# core knowing any plugin by name.
PROVIDES_GROUP = "lattice_engine.quant_methods"


def missing_method_hint(name: str) -> str:
    """'; it is provided by <distribution> (plugin <p>), which is not loaded ...' when an
    installed distribution declares method `name`, else a pointer to what is installed."""
    import importlib.metadata as metadata
    for ep in metadata.entry_points(group=PROVIDES_GROUP):
        if ep.name != name or ep.dist is None:
            continue
        plugins = [p.name for p in metadata.entry_points(group="lattice_engine")
                   if p.dist is not None and p.dist.name == ep.dist.name]
        return (f"; {name!r} is provided by the installed distribution {ep.dist.name} "
                f"(plugin {', '.join(plugins) or '?'}), which is not loaded: add it to "
                f"LATTICE_PLUGINS / [plugins] load")
    return (f"; no installed plugin declares quant method {name!r} (plugins list theirs under "
            f"the entry-point group {PROVIDES_GROUP}); `lattice plugins --all` shows what is "
            f"installed")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown tensor role {role!r}; valid roles: {', '.join(ROLES)}")
