"""The q4_sym and q4_asym quant methods, with a configurable group size, and q4_0 (ggml's
Q4_0 rule at group 32, to reproduce llama.cpp's files).

Linear layers get the 4-bit format of the chosen group size; the token embedding and the
lm_head, tied or not, stay q8_0. (Lattice v0.2.3 kept a tied table f16 because its per-row
quantized lm_head sharpened the logits; q8_0's blocks of 32 do not: on SmolLM2, 32,768
WikiText-2 tokens, q4_asym with a q8_0 table scores 19.8105 against 19.8184 with an f16
one, q4_sym 25.7360 against 25.7414; bench/tied_head.py.) `[quant.overrides]` can change
any of them per tensor, e.g. `"*embed_tokens*" = "f16"`. Rows whose length is not a multiple of the group fall back to q8_0 when
they fit its blocks of 32, else f16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lattice_engine.errors import ConfigError
from lattice_engine.quant.methods import QuantMethod

from .formats import GGML_Q4_0, GROUP_SIZES, format_name

DEFAULT_GROUP = 32  # chosen by measurement: see bench/quant_quality.py and the README


@dataclass(frozen=True)
class GroupedQuantMethod(QuantMethod):
    """A QuantMethod whose linear format depends on a group size."""

    family: str = ""
    group_size: int = DEFAULT_GROUP

    def with_group_size(self, group_size):
        if group_size is None or group_size == self.group_size:
            return self
        if self.family == GGML_Q4_0:
            raise ConfigError(f"quant.group_size = {group_size!r} does not apply to q4_0, "
                              f"ggml's Q4_0 rule, which has groups of 32 only; remove it or "
                              f"use q4_sym for other group sizes")
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"quant.group_size = {group_size!r} is not supported by "
                              f"{self.name}; choices: {', '.join(map(str, GROUP_SIZES))}")
        return dataclasses.replace(self, group_size=group_size,
                                   linear=format_name(self.family, group_size))


def make_method(family: str, description: str) -> GroupedQuantMethod:
    return GroupedQuantMethod(
        family, linear=format_name(family, DEFAULT_GROUP), embedding="q8_0", lm_head="q8_0",
        tied_embedding="q8_0", fallback=("q8_0", "f16"), description=description, family=family,
        group_size=DEFAULT_GROUP)


Q4_METHODS = (
    make_method("q4_sym", "4-bit symmetric blocks (scale = absmax / 7), f16 scales; group "
                          "32 is GGUF Q4_0's layout"),
    make_method("q4_asym", "4-bit asymmetric blocks (scale = (max - min) / 15, offset = min), "
                           "f16 scale and offset; group 32 is GGUF Q4_1's layout"),
    make_method(GGML_Q4_0, "llama.cpp's Q4_0 rule (scale = signed max / -8), groups of 32: "
                           "the blocks llama-quantize writes, stored as q4_sym_g32"),
)
