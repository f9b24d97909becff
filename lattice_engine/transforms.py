"""Load-time weight transforms: rewrites of a checkpoint's tensors and config before the
model is built (QuaRot's rotation folding is the first).

A plugin registers a `WeightTransform` through `register_weight_transforms`. Its name is
also the name of its config section: `[quarot] enabled = true, seed = 0` builds the
transform's settings dataclass from that table, and an enabled transform runs on every
checkpoint the engine loads, after reading and before quantization, so the quant method
sees the transformed float weights.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Mapping

from .errors import PluginError
from .io.checkpoint import Checkpoint


@dataclass(frozen=True)
class WeightTransform:
    """A named checkpoint rewrite.

    Attributes:
        name: the registry name and the config section that configures it.
        settings: a frozen dataclass of its options with defaults, including
            `enabled: bool`; `[name]` in the config file fills it.
        apply: (checkpoint, settings, formats) -> a new Checkpoint. `formats` maps format
            names to `WeightFormat`s, to read packed tensors as floats. Must not modify the
            checkpoint it receives.
        description: one line for `lattice plugins`.
    """

    name: str
    settings: type
    apply: Callable[[Checkpoint, Any, Mapping[str, Any]], Checkpoint]
    description: str = ""

    def __post_init__(self):
        if not is_dataclass(self.settings) or "enabled" not in {f.name for f in fields(self.settings)}:
            raise PluginError(f"weight transform {self.name!r}: settings must be a dataclass "
                              f"with an `enabled` field")


def apply_transforms(checkpoint: Checkpoint, enabled: Mapping[str, Any], registry) -> Checkpoint:
    """Run the transforms named in `enabled` (name -> settings), in that order."""
    formats = registry.items.get("weight_formats", {})
    for name, settings in enabled.items():
        transform = registry.get("weight_transforms", name)
        checkpoint = transform.apply(checkpoint, settings, formats)
        if not isinstance(checkpoint, Checkpoint):
            raise PluginError(f"weight transform {name!r} returned {type(checkpoint).__name__}, "
                              f"not a Checkpoint")
    return checkpoint
