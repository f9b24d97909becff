"""The plugin contract as code: what each hook's registered objects must provide.

`lattice_engine.hookspecs` says which hooks exist and when they are called; this module says
what the objects handed to each hook's `register` callback must be, as Protocols a plugin
author can read (and type-check against), and checks them when the registry is built. A
plugin that registers something incomplete fails at that moment with a PluginError naming
the plugin, the kind, the name and the missing member, instead of failing later inside a
forward pass or a request.

What is checked at registration (an object's behaviour is the plugin's own tests' job; see
`lattice_engine.testing`):

- architectures: a class with `from_checkpoint(checkpoint, loader, ops)` whose instances
  provide the `CausalLM` members (`forward`, `make_cache`, `hidden_states`, `logits`), or
  the `Encoder` member (`encode`: an embedding model, which cannot generate); a class that
  also defines `PagedCausalLM`'s members can be served with continuous batching.
- weight formats: a `WeightFormat` with a non-empty name, positive block size, bytes per
  block and row group, callable quantize / to_float, optional callable matmul / embed /
  native_layout, a `c_matmul` that is None or two integer addresses, and a
  `c_matmul_grouped` that is None or, with a c_matmul, one integer address.
- quant methods: a `QuantMethod` (or subclass) whose formats are registered.
- weight transforms: a `WeightTransform`.
- samplers: a callable factory `factory(rng) -> (logits -> token id)`.
- logits processors: a callable factory `factory(value) -> processor or None`, under a name
  that is not one of the `SamplingParams` fields the engine itself reads (`seed`, `stop`,
  ...): a processor named `seed` would be fed every request's seed.
- adapters: an `AdapterKind` (a name, callable `load` and `save`).
- drafters: a callable factory `factory(target, tokenizer, options) -> Drafter`; what it
  builds is checked against `Drafter` when it is built (`check_drafter`).
- encoders: an object with a non-empty `modality` string and callable `supports` and
  `load` (`InputEncoder`); what `load` returns is checked when it is loaded
  (`LoadedInputEncoder`).
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import PluginError

Processor = Callable[[Sequence[int], np.ndarray], np.ndarray]


# --- what a model is ----------------------------------------------------------------------

@runtime_checkable
class ModelConfig(Protocol):
    """`model.config`: at least the vocabulary size; `max_position_embeddings`, when
    present, bounds the context the engine lets a request use."""

    vocab_size: int


@runtime_checkable
class CausalLM(Protocol):
    """What the engine calls on a model: generation, perplexity and the CLI.

    Shapes: tokens int64 [B, T]; hidden float32 [B, T, H]; logits float32 [B, T, V] (V =
    config.vocab_size). `cache` is whatever `make_cache` returns: the engine only passes it
    back. `forward` appends `tokens` after the cache's contents and returns their logits
    (only the last position's, [B, 1, V], when last_only).
    """

    config: ModelConfig

    def make_cache(self, batch: int = 1, capacity: int = 256) -> Any: ...

    def forward(self, tokens: np.ndarray, cache: Any, last_only: bool = False) -> np.ndarray: ...

    def hidden_states(self, tokens: np.ndarray, cache: Any) -> np.ndarray: ...

    def logits(self, hidden: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class PagedCausalLM(CausalLM, Protocol):
    """A model continuous batching can serve (`lattice serve`, `Engine.start_batching`).

    `make_paged_cache` returns a `lattice_engine.cache.PagedKVCache` (plus recurrent-state
    slots for `max_sequences` sequences if the model has recurrent layers); `forward_paged`
    takes a `lattice_engine.models.paged_forward.PagedBatch` and returns float32 logits
    [len(batch.logit_rows), V], writing the batch's new keys / values into the cache.
    """

    def make_paged_cache(self, num_blocks: int, block_size: int = 16, variant: str = "",
                         max_sequences: int = 0) -> Any: ...

    def forward_paged(self, batch: Any, cache: Any) -> np.ndarray: ...


@runtime_checkable
class Encoder(Protocol):
    """An embedding-only model (BERT family): `lattice_engine.embedding` pools its hidden
    states; it cannot generate. tokens int64 [B, T], right-padded; mask [B, T] 1 for a real
    token, 0 for padding, which no real token may attend to. Returns float32 [B, T, H].
    `config.max_position_embeddings` bounds T."""

    config: ModelConfig

    def encode(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


class Architecture(Protocol):
    """The class registered for a model_type: builds a model from a checkpoint.

    `checkpoint` is a `lattice_engine.io.checkpoint.Checkpoint` (config dict, tensors by
    name); `loader` a `lattice_engine.models.base.WeightLoader`: `loader.matrix(name, shape,
    role)` returns a `PackedMatrix` in the format the quant method picks for the role
    ("linear", "embedding", "lm_head" or "tied_embedding"), `loader.vector(name, shape)` a
    float32 array; `ops` the op set to compute with (`lattice_engine.ops` or the native
    kernels, the same function names). An optional `sanitize(config) -> config` classmethod
    fixes up a checkpoint's config before use.
    """

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, loader: Any, ops: Any) -> CausalLM: ...


@runtime_checkable
class AdapterKind(Protocol):
    """An adapter kind registered by `register_adapters` (e.g. LoRA).

    `load(path, model, name)` reads the adapter files at `path` (a folder) and returns a
    `lattice_engine.adapters.AdapterWeights` named `name` (the folder's name when None),
    refusing with a `lattice_engine.errors.RequestError` (naming the module, shape or
    config key, and what would fit) files that do not fit `model`; `save(weights, path)`
    writes them back in the kind's file format, atomically. Optionally,
    `train_step(model, weights, tokens, options, state)` -> (new weights, loss, gradient
    norm, state) trains the adapter on one example (`AdapterManager.train`, the server's
    `/v1/adapt_lora_adapter`); `options` is the request's optimizer settings, `state` what
    the previous call returned (None at first).
    """

    name: str

    def load(self, path: Any, model: Any, name: Optional[str] = None) -> Any: ...

    def save(self, weights: Any, path: Any) -> None: ...


ADAPTER_KIND_MEMBERS = ("load", "save")


class Drafter(Protocol):
    """A speculative-decoding drafter (`register_drafters`); see `lattice_engine.speculative`.

    - `propose(request, k)` -> `Draft`: up to k tokens to follow `request.token_ids` (fewer,
      or none, when it has nothing worth verifying); `Draft.probs` carries the distribution
      each token was drawn from, or None when the drafter is deterministic (q one-hot).
    - `verify(rows, draft, rng)` -> list of token ids: a prefix of `draft.tokens` followed by
      exactly one more token, decided from the target distributions `rows.probs(i)` /
      `rows.processed(i)` (i = 0 .. len(draft.tokens)) so that the output is distributed as
      plain decoding's (the spec_decode plugin's rejection sampler does this).
    - `accepted(request, drafted, kept)`: the outcome of the verify just run (a drafter with
      its own cache rolls it back here or on its next propose).
    - `release(request)`: the request ended; drop its per-request state.
    - `wants_hidden`: True for a drafter that reads the target's hidden states
      (`DraftRequest.hidden`), e.g. an MTP head.
    - optional `propose_batch(requests, ks)` -> list of `Draft`: the drafts of several
      requests of one continuous-batching step at once (a draft model batches its forward);
      when it raises, the engine falls back to `propose` per request.
    - optional `relative_cost` (float): what drafting one token costs, as a fraction of one
      plain decode step of the target (a draft model: about its weight bytes over the
      target's; 0 or absent: unknown or free). The continuous-batching plan weighs it until
      it has measured the drafter (`Speculation.cost_per_token`), so a batch where even
      that cost would not pay (8 streams with a draft model) never tries the drafter; an
      estimate on the low side only costs a try.
    """

    wants_hidden: bool

    def propose(self, request: Any, k: int) -> Any: ...

    def verify(self, rows: Any, draft: Any, rng: np.random.Generator) -> list[int]: ...

    def accepted(self, request: Any, drafted: int, kept: int) -> None: ...

    def release(self, request: Any) -> None: ...


DRAFTER_MEMBERS = ("propose", "verify", "accepted", "release")


# --- what an input (image) encoder is --------------------------------------------------

@runtime_checkable
class LoadedInputEncoder(Protocol):
    """An input encoder bound to one checkpoint's weights (what `InputEncoder.load`
    returns).

    `placeholder_id`: the token id a chat template writes once per input (`<|image_pad|>`);
    the engine repeats it `prepare(...).num_tokens` times. `prepare(data: bytes)` decodes
    and preprocesses one input and returns a `lattice_engine.multimodal.PreparedInput`
    (raising `RequestError` naming the problem and the limit for a bad or oversized input);
    `encode(prepared)` returns its `lattice_engine.multimodal.EncodedInput` (rows of the
    text model's hidden size).
    """

    modality: str
    placeholder_id: int

    def prepare(self, data: bytes) -> Any: ...

    def encode(self, prepared: Any) -> Any: ...


class InputEncoder(Protocol):
    """Registered by `register_encoders`: knows which checkpoints it can run and loads
    its weights. `load(checkpoint, limits)` gets a `lattice_engine.io.checkpoint.Checkpoint`
    and a `lattice_engine.multimodal.InputLimits`."""

    name: str
    modality: str

    def supports(self, config: Mapping[str, Any]) -> bool: ...

    def load(self, checkpoint: Any, limits: Any) -> LoadedInputEncoder: ...


SamplerFactory = Callable[[np.random.Generator], Callable[[np.ndarray], int]]
ProcessorFactory = Callable[[Any], Optional[Processor]]

CAUSAL_LM_MEMBERS = ("forward", "make_cache", "hidden_states", "logits")
PAGED_MEMBERS = ("make_paged_cache", "forward_paged")
ENCODER_MEMBERS = ("encode",)


def missing_members(obj: Any, names: Sequence[str]) -> list[str]:
    """The names in `names` that `obj` (a class or an instance) lacks as callables."""
    return [n for n in names if not callable(getattr(obj, n, None))]


def is_servable(model_or_class: Any) -> bool:
    """Whether continuous batching can run this model (it has the paged members)."""
    return not missing_members(model_or_class, PAGED_MEMBERS)


# --- the version a plugin can require --------------------------------------------------------

def require_plugin_api(major: int, minor: int = 0, *, plugin: str = "this plugin") -> None:
    """Refuse to run against a hook contract this plugin was not written for: call it at
    the top of a plugin module. The major number must match (it changes when a hook or a
    registered object changes incompatibly) and the minor number be at least `minor` (it
    grows when hooks or optional arguments are added)."""
    from .hookspecs import PLUGIN_API_VERSION
    have_major, have_minor = (int(p) for p in PLUGIN_API_VERSION.split("."))
    if have_major != major or have_minor < minor:
        fix = "upgrade lattice-engine" if (have_major, have_minor) < (major, minor) else \
            f"upgrade {plugin}"
        raise PluginError(f"{plugin} needs lattice-engine plugin API {major}.{minor} or a "
                          f"later {major}.x; this engine provides {PLUGIN_API_VERSION}: {fix}")


# --- checks run when the registry is built --------------------------------------------------

def _fail(owner: str, kind: str, name: Any, problem: str) -> PluginError:
    return PluginError(f"plugin {owner!r} registered {kind} {name!r}, which {problem}")


def check_architecture(owner: str, name: str, value: Any) -> None:
    if not inspect.isclass(value):
        raise _fail(owner, "architecture", name,
                    f"is a {type(value).__name__}, not a class with from_checkpoint(...)")
    lacking = missing_members(value, ("from_checkpoint",) + CAUSAL_LM_MEMBERS)
    if lacking and not missing_members(value, ("from_checkpoint",) + ENCODER_MEMBERS):
        return  # an encoder: embeddings only
    if lacking:
        raise _fail(owner, "architecture", name,
                    f"lacks {', '.join(lacking)} (see lattice_engine.contract.CausalLM; an "
                    f"embedding-only model provides `encode` instead, see Encoder)")


def check_weight_format(owner: str, name: str, value: Any) -> None:
    from .quant.formats import WeightFormat
    if not isinstance(value, WeightFormat):
        raise _fail(owner, "weight format", name,
                    f"is a {type(value).__name__}, not a lattice_engine.quant.formats.WeightFormat")
    for field_name in ("block_size", "bytes_per_block", "row_group"):
        v = getattr(value, field_name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _fail(owner, "weight format", name, f"has {field_name} = {v!r}; it must be an "
                        f"integer >= 1")
    for field_name in ("quantize", "to_float"):
        if not callable(getattr(value, field_name)):
            raise _fail(owner, "weight format", name, f"has a {field_name} that is not callable")
    for field_name in ("matmul", "embed", "native_layout"):
        v = getattr(value, field_name)
        if v is not None and not callable(v):
            raise _fail(owner, "weight format", name,
                        f"has a {field_name} that is neither None nor callable")
    c = value.c_matmul
    if c is not None and not (isinstance(c, tuple) and len(c) == 2 and
                              all(isinstance(a, int) and a >= 0 for a in c) and c[0]):
        raise _fail(owner, "weight format", name, f"has c_matmul = {c!r}; it must be None or "
                    f"(function address, context address) as integers")
    g = value.c_matmul_grouped
    if g is not None and not (isinstance(g, int) and not isinstance(g, bool) and g > 0):
        raise _fail(owner, "weight format", name, f"has c_matmul_grouped = {g!r}; it must be "
                    f"None or a function address as an integer")
    if g is not None and c is None:
        raise _fail(owner, "weight format", name, "has a c_matmul_grouped but no c_matmul: "
                    "the grouped matmul takes c_matmul's context; set both or neither")
    if value.gguf_type is not None and not isinstance(value.gguf_type, int):
        raise _fail(owner, "weight format", name, f"has gguf_type = {value.gguf_type!r}; "
                    f"it must be None or a GGML type id")
    f = value.from_stored
    if f is not None and not (isinstance(f, Mapping) and all(
            isinstance(k, str) and k and callable(v) for k, v in f.items())):
        raise _fail(owner, "weight format", name, f"has from_stored = {f!r}; it must be None "
                    f"or a mapping of stored type names (e.g. 'q4_k') to re-encoders "
                    f"(raw rows, cols) -> rows of this format")


def check_quant_method(owner: str, name: str, value: Any, formats: Mapping[str, Any]) -> None:
    from .quant.methods import QuantMethod
    if not isinstance(value, QuantMethod):
        raise _fail(owner, "quant method", name,
                    f"is a {type(value).__name__}, not a lattice_engine.quant.methods.QuantMethod")
    named = [(role, getattr(value, role)) for role in
             ("linear", "embedding", "lm_head", "tied_embedding")]
    named += [("fallback", fmt) for fmt in value.fallbacks]
    for role, fmt in named:
        if fmt not in formats:
            raise _fail(owner, "quant method", name,
                        f"stores {role} matrices as {fmt!r}, a weight format nobody "
                        f"registered (registered: {', '.join(sorted(formats))})")


def check_weight_transform(owner: str, name: str, value: Any) -> None:
    from .transforms import WeightTransform
    if not isinstance(value, WeightTransform):
        raise _fail(owner, "weight transform", name,
                    f"is a {type(value).__name__}, not a lattice_engine.transforms.WeightTransform")


def check_adapter_kind(owner: str, name: str, value: Any) -> None:
    lacking = missing_members(value, ADAPTER_KIND_MEMBERS)
    if lacking:
        raise _fail(owner, "adapter kind", name,
                    f"lacks {', '.join(lacking)} (see lattice_engine.contract.AdapterKind)")


def check_sampler(owner: str, name: str, value: Any) -> None:
    if not callable(value):
        raise _fail(owner, "sampler", name, f"is a {type(value).__name__}, not a factory "
                    f"rng -> (logits -> token id)")


def check_drafter_factory(owner: str, name: str, value: Any) -> None:
    if not callable(value):
        raise _fail(owner, "drafter", name, f"is a {type(value).__name__}, not a factory "
                    f"(target, tokenizer, options) -> Drafter")


def check_drafter(name: str, drafter: Any) -> None:
    """What a drafter factory built must provide (lattice_engine.contract.Drafter)."""
    lacking = missing_members(drafter, DRAFTER_MEMBERS)
    if lacking or not isinstance(getattr(drafter, "wants_hidden", None), bool):
        what = ", ".join(lacking) if lacking else "a boolean wants_hidden"
        raise PluginError(f"drafter {name!r} built a {type(drafter).__name__} that lacks "
                          f"{what} (see lattice_engine.contract.Drafter)")


def reserved_processor_names() -> frozenset:
    """SamplingParams fields that are not logits processors: a processor by one of these
    names would be handed that field's value on every request."""
    from .sampling import BUILTIN_PROCESSORS, SamplingParams
    return frozenset(f.name for f in fields(SamplingParams)) - set(BUILTIN_PROCESSORS)


def check_logits_processor(owner: str, name: str, value: Any) -> None:
    if name in reserved_processor_names():
        raise _fail(owner, "logits processor", name,
                    f"shares its name with a sampling parameter the engine reads "
                    f"({', '.join(sorted(reserved_processor_names()))}); rename it")
    if not callable(value):
        raise _fail(owner, "logits processor", name, f"is a {type(value).__name__}, not a "
                    f"factory value -> processor")


def check_encoder(owner: str, name: str, value: Any) -> None:
    modality = getattr(value, "modality", None)
    if not isinstance(modality, str) or not modality:
        raise _fail(owner, "encoder", name, f"has modality = {modality!r}; it must be a "
                    f"non-empty string such as 'image'")
    lacking = missing_members(value, ("supports", "load"))
    if lacking:
        raise _fail(owner, "encoder", name,
                    f"lacks {', '.join(lacking)} (see lattice_engine.contract.InputEncoder)")


def check_loaded_encoder(owner: str, value: Any) -> None:
    """Refuse what an encoder's `load` returned unless it is a `LoadedInputEncoder`."""
    lacking = missing_members(value, ("prepare", "encode"))
    pid = getattr(value, "placeholder_id", None)
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        lacking.append(f"placeholder_id (an int token id, got {pid!r})")
    if lacking:
        raise PluginError(f"encoder {owner!r} loaded a {type(value).__name__} that lacks "
                          f"{', '.join(lacking)} (see lattice_engine.contract.LoadedInputEncoder)")


def check_registration(kind: str, owner: str, name: str, value: Any, registry) -> None:
    """Refuse `value` for registry `kind` unless it honours the contract above."""
    if kind == "quant_methods":
        check_quant_method(owner, name, value, registry.items.get("weight_formats", {}))
        return
    check = {"architectures": check_architecture, "weight_formats": check_weight_format,
             "weight_transforms": check_weight_transform, "samplers": check_sampler,
             "logits_processors": check_logits_processor,
             "adapters": check_adapter_kind,
             "drafters": check_drafter_factory, "encoders": check_encoder}.get(kind)
    if check is not None:
        check(owner, name, value)
