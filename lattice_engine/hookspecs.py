"""Every hook a lattice-engine plugin can implement.

Hooks that contribute things take a `register` callback owned by the core: the core checks
what arrives and refuses a name that another plugin already registered. All of them are
called once, when the plugin manager builds its registry (see `lattice_engine.plugins`).

A plugin is a module or object with functions decorated by `lattice_engine.hookimpl`,
published through the entry-point group "lattice_engine". What each registered object must
provide is written as code in `lattice_engine.contract` (Protocols, checked at
registration: a missing member is a PluginError naming the plugin and the member). Entries
are registered in pluggy's call order: `tryfirst` implementations first (the core's own are
tryfirst), then the others, later-installed first, then `trylast`. A plugin states the
contract it was written for with `lattice_engine.require_plugin_api(major, minor)` at its
top: against another major version, or an older minor one, it fails to load with a
message naming both versions.
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
PLUGIN_API_VERSION = "1.3"  # 1.1: register_drafters; 1.2: register_adapters; 1.3: register_encoders


# --- Models ---------------------------------------------------------------------------

@hookspec
def register_architectures(register: Callable[[str, type], None]) -> None:
    """Contribute model classes by HF `model_type`.

    Args:
        register: call `register(model_type, model_class)` once per architecture. The class
            must provide `from_checkpoint(checkpoint, loader, ops)` returning a model with
            the `lattice_engine.contract.CausalLM` members (forward, make_cache,
            hidden_states, logits, config.vocab_size); with `PagedCausalLM`'s members too
            (make_paged_cache, forward_paged) it can also be served with continuous
            batching. An embedding-only model provides `contract.Encoder`'s `encode(tokens,
            mask)` instead of the CausalLM members (it cannot generate; see
            `lattice_engine.embedding`). It need not subclass anything of the core's.
            Registering a model_type
            that another plugin already owns raises PluginError naming both owners.
    """


# --- Weights --------------------------------------------------------------------------

@hookspec
def register_weight_formats(register: Callable[[object], None]) -> None:
    """Contribute block formats for stored matrices.

    Args:
        register: call `register(weight_format)` with a
            `lattice_engine.quant.formats.WeightFormat` (name, block size, bytes per block,
            quantize, to_float, optional native matmul/embed, optional GGUF type id); its
            docstring says how the engine calls each field. `lattice_engine.testing.formats
            .check_weight_format` checks a format against that contract.
    """


@hookspec
def register_quant_methods(register: Callable[[object], None]) -> None:
    """Contribute quantization methods selectable by `[quant] method = NAME`.

    Args:
        register: call `register(quant_method)` with a
            `lattice_engine.quant.methods.QuantMethod`, which decides the weight format of
            each tensor by role, name and row length. The formats it names must already be
            registered (weight formats are collected before quant methods). A distribution
            can list its methods under the entry-point group `lattice_engine.quant_methods`
            (name = method) so that asking for one while the plugin is not loaded says which
            distribution provides it.
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
            logits processors ran, so temperature and truncation are already applied. One
            sampler is built per request, so it may keep state across that request's tokens.
    """


@hookspec
def register_logits_processors(register: Callable[[str, Callable], None]) -> None:
    """Contribute logits processors, enabled per request by a parameter of the same name.

    Args:
        register: call `register(name, factory)`; `factory(value)` returns a function
            `(token_ids: list[int], logits: float32 [V]) -> float32 [V]`, or None when
            `value` makes the processor a no-op (e.g. top_k = 0). `value` comes from the
            request's (or `[sampling] processors`') entry of the same name. Processors run
            in registry order: the built-ins first (they are tryfirst), then plugins'. A
            name that is a `SamplingParams` field (seed, stop, max_tokens, ...) is refused.
    """


# --- Adapters -------------------------------------------------------------------------

@hookspec
def register_adapters(register: Callable[[object], None]) -> None:
    """Contribute adapter kinds (LoRA) applied around a model's named linear modules.

    Args:
        register: call `register(kind)` with an object providing the
            `lattice_engine.contract.AdapterKind` members: `name` (also its config section,
            `[name]`), `load(path, model, name)` returning `lattice_engine.adapters
            .AdapterWeights` checked against the model's linears (`adapters.named_linears`)
            and `save(weights, path)`, optionally `train_step(model, weights, tokens,
            options, state)` for online training. The core keeps loaded adapters resident in the
            model's `AdapterSlots` and applies them per request in every forward (numpy,
            per-kernel native and the fused C steps); `Engine.load_adapter(path,
            kind=name)` and the server's `/v1/load_lora_adapter` call `load`.
    """


# --- Speculative decoding -------------------------------------------------------------

@hookspec
def register_drafters(register: Callable[[str, Callable], None]) -> None:
    """Contribute drafters for speculative decoding, selectable by `[speculative] method =
    NAME` and per request (`speculative: {"method": NAME}`).

    Args:
        register: call `register(name, factory)`; `factory(target, tokenizer, options)`
            returns a `lattice_engine.contract.Drafter` for the loaded target model
            (`options`: the `[speculative]` section's drafter settings as a dict; a bad
            one is a ConfigError naming the key, the value and the choices). The engine
            asks the drafter for k tokens after a sequence (`propose`), scores them in one
            verify forward of k + 1 positions, and lets the drafter decide which to keep
            (`verify`, given the target's distributions `speculative.TargetRows` exactly as
            plain decoding samples from them, and the request's RNG); it then rolls the
            KV cache, recurrent states and grammar back to what was kept. A drafter that
            lives inside the target (an MTP head) sets `wants_hidden` and reads the target's
            final hidden states from `DraftRequest.hidden`.
    """


# --- Inputs other than text -------------------------------------------------------------

@hookspec
def register_encoders(register: Callable[[object], None]) -> None:
    """Contribute encoders that turn a non-text input (an image) into embeddings that
    replace the placeholder tokens of a prompt.

    Args:
        register: call `register(encoder)` with an object providing
            `lattice_engine.contract.InputEncoder`: `name`, `modality` ("image"),
            `supports(config) -> bool` (whether it can run the vision tower of a checkpoint
            with this HF config) and `load(checkpoint, limits) -> LoadedInputEncoder`. The engine
            asks each registered encoder of a modality in registry order and loads the first
            that supports the model, once, on the first request with such an input. The
            `LoadedInputEncoder` prepares raw bytes (`prepare`: decode, check limits, preprocess;
            cheap, run when the request arrives, errors are `RequestError`s) and encodes a
            prepared input (`encode`: the heavy part, run by the scheduler) into a
            `lattice_engine.multimodal.EncodedInput`.
    """
