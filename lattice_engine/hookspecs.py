"""Every hook a lattice-engine plugin can implement.

Hooks that contribute things take a `register` callback owned by the core: the core checks
what arrives and refuses a name that another plugin already registered. All of them are
called once, when the plugin manager builds its registry (see `lattice_engine.plugins`).

A plugin is a module or object with functions decorated by `lattice_engine.hookimpl`,
published through the entry-point group "lattice_engine".
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("lattice_engine")
hookimpl = pluggy.HookimplMarker("lattice_engine")

# The version of the hook contract in this file, which a plugin can require: the major
# number changes when a hook is removed or its arguments or the objects it registers change
# incompatibly, the minor number when a hook or an optional argument is added. It moves
# independently of the engine's release number; `lattice --version` prints both.
PLUGIN_API_VERSION = "1.0"


# --- Models ---------------------------------------------------------------------------

@hookspec
def register_architectures(register: Callable[[str, type], None]) -> None:
    """Contribute model classes by HF `model_type`.

    Args:
        register: call `register(model_type, model_class)` once per architecture. The class
            must provide `from_checkpoint(checkpoint, quant, ops)` (see
            `lattice_engine.models.base`). Registering a model_type that another plugin
            already owns raises PluginError naming both owners.
    """


# --- Weights --------------------------------------------------------------------------

@hookspec
def register_weight_formats(register: Callable[[object], None]) -> None:
    """Contribute block formats for stored matrices.

    Args:
        register: call `register(weight_format)` with a
            `lattice_engine.quant.formats.WeightFormat` (name, block size, bytes per block,
            quantize, to_float, optional native matmul/embed, optional GGUF type id).
    """


@hookspec
def register_quant_methods(register: Callable[[object], None]) -> None:
    """Contribute quantization methods selectable by `[quant] method = NAME`.

    Args:
        register: call `register(quant_method)` with a
            `lattice_engine.quant.methods.QuantMethod`, which decides the weight format of
            each tensor by name and shape. The formats it names must be registered too.
    """


@hookspec
def register_weight_transforms(register: Callable[[object], None]) -> None:
    """Contribute load-time checkpoint rewrites (e.g. QuaRot's rotation folding).

    Args:
        register: call `register(weight_transform)` with a
            `lattice_engine.transforms.WeightTransform`. Its name is also its config section
            (`[name] enabled = true, ...`); enabled transforms run, in config order, on the
            checkpoint's float weights before the quant method packs them.
    """


# --- Sampling -------------------------------------------------------------------------

@hookspec
def register_samplers(register: Callable[[str, Callable], None]) -> None:
    """Contribute token samplers selectable by `[sampling] sampler = NAME`.

    Args:
        register: call `register(name, factory)`; `factory(rng: numpy.random.Generator)`
            returns a function `logits (float32 [V]) -> token id`. Logits arrive after the
            logits processors ran, so temperature and truncation are already applied.
    """


@hookspec
def register_logits_processors(register: Callable[[str, Callable], None]) -> None:
    """Contribute logits processors, enabled per request by a parameter of the same name.

    Args:
        register: call `register(name, factory)`; `factory(value)` returns a function
            `(token_ids: list[int], logits: float32 [V]) -> float32 [V]`, or None when
            `value` makes the processor a no-op (e.g. top_k = 0). Processors run in
            registration order, built-ins first.
    """
