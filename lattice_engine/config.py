"""The config file (TOML) as frozen dataclasses, with errors that name key, value and choices.

    [model]    path = "smollm2-135m", backend = "auto" | "native" | "numpy", threads = 2,
               kv_cache = "auto" | "f32" | "f16" | "q8_0" (how every KV cache stores keys and
               values; auto: f32 for float32 weights, f16 for any other format)
    [quant]    method = "f32", overrides = { "model.layers.0.*" = "f16" }, group_size = 64
               (method omitted: as the checkpoint is stored: a Q8_0 / F16 GGUF file in its
               own blocks, other files f32 unless `lattice quantize` wrote them; group_size
               only for grouped methods such as q4_asym)
    [sampling] temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens, stop,
               presence_penalty, frequency_penalty, logit_bias = { "28" = -100 }, sampler,
               processors
    [plugins]  load = ["name", ...]   (omit to load every installed plugin)
    [speculative] method = "ngram" | "draft_model" (a registered drafter; omit: off),
               num_draft_tokens = 4, adaptive = true, and the drafter's own keys
               (ngram: prompt_lookup_min / prompt_lookup_max; draft_model: model, quant)
    [inputs]   max_images = 4, max_bytes, max_pixels, local_folder, encoded_cache (images
               in chat requests, for models an encoder plugin supports)
    [server]   host = "127.0.0.1", port = 8000, api_key, max_body_bytes, max_concurrency,
               model_name, kv_cache_tokens, block_size, max_running, step_tokens,
               interleave_tokens, max_itl_rise, prefill_step_seconds, header_timeout,
               read_timeout
    [ray]      replicas = 1, threads_per_replica = 1, min_replicas / max_replicas
               (autoscaling bounds; both or neither), address (an existing Ray cluster;
               unset: `lattice serve --replicas N` starts a local one), routing = "prefix" |
               "round-robin", prefix_blocks = 4, max_imbalance = 4 (see
               lattice_engine.server.ray_serve)
    [<name>]   a plugin's own section, e.g. [quarot] enabled = true (weight transforms):
               checked against the installed plugins by `Config.validate`; a section named
               after an adapter kind, e.g. [lora], is an `AdapterSection`:
               adapters = { sql = "path/to/peft-dir" }, mixtures = { mix = { sql = 0.7,
               chat = 0.3 } }, merge = "sql" (fold one into the weights), loaded by
               `Engine.from_config`

`lattice.toml` in the working directory is read when present; `--config PATH` picks
another file; command-line flags override both.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import abc
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError, LatticeError
from .sampling import SamplingParams
from .speculative import SpeculativeOptions

from .io.catalog import DEFAULT_MODEL

DEFAULT_CONFIG_FILE = "lattice.toml"
MAX_THREADS = 64  # LK_MAX_THREADS in native/include/lattice_kernels.h


@dataclass(frozen=True)
class ModelSection:
    path: str = DEFAULT_MODEL
    backend: str = "auto"
    threads: int = 0  # 0: all cores
    kv_cache: str = "auto"  # the dense and paged caches' storage (cache/dense.py KV_DTYPES)

    def __post_init__(self):
        _choice("model.backend", self.backend, ("auto", "native", "numpy"))
        _choice("model.kv_cache", self.kv_cache, ("auto", "f32", "f16", "q8_0"))
        _at_least("model.threads", self.threads, 0)
        if self.threads > MAX_THREADS:  # the C pool would clamp it silently (LK_MAX_THREADS)
            raise ConfigError(f"model.threads = {self.threads} is out of range: the kernels "
                              f"run at most {MAX_THREADS} threads; use 0 (all cores) or "
                              f"1..{MAX_THREADS}")


@dataclass(frozen=True)
class QuantSection:
    method: Optional[str] = None  # None: as stored (loading.gguf_as_stored; folders f32)
    overrides: Mapping[str, str] = field(default_factory=dict)
    group_size: Optional[int] = None  # grouped methods only (q4_sym, q4_asym)


@dataclass(frozen=True)
class PluginsSection:
    load: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class InputsSection:
    """Images in requests (`multimodal.InputLimits`), for models with an encoder plugin."""

    max_images: int = 4               # images per request
    max_bytes: int = 20 * 1024 * 1024  # encoded bytes of one image
    max_pixels: int = 4096 * 4096     # width * height of one image as decoded
    local_folder: Optional[str] = None  # file: URLs allowed below this folder (None: none)
    encoded_cache: int = 8            # encoded images kept for later requests (0: none)

    def __post_init__(self):
        for name in ("max_images", "max_bytes", "max_pixels"):
            _at_least(f"inputs.{name}", getattr(self, name), 1)
        _at_least("inputs.encoded_cache", self.encoded_cache, 0)
        if self.local_folder is not None and not Path(self.local_folder).is_dir():
            raise ConfigError(f"inputs.local_folder = {self.local_folder!r} is not a folder; "
                              f"give an existing folder or leave it out")

    def limits(self):
        from .multimodal import InputLimits
        return InputLimits(self.max_images, self.max_bytes, self.max_pixels, self.local_folder)


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    max_concurrency: int = 64
    # continuous batching (lattice_engine.batching.BatchingOptions)
    model_name: Optional[str] = None  # the name clients send as "model" (default: model.path)
    kv_cache_tokens: int = 16384      # paged KV pool size, in tokens
    block_size: int = 16              # tokens per KV block (the prefix-sharing unit)
    max_running: int = 16             # sequences batched at once
    step_tokens: int = 512            # tokens per forward when nothing decodes
    interleave_tokens: int = 64       # prefill tokens per forward while others decode (max)
    max_itl_rise: float = 2.0         # shrink that slice to keep decode steps within this
                                      # factor of a decode-only step (0: off)
    prefill_step_seconds: float = 0.5  # a prefill-only step takes about this long, so a
                                      # request arriving meanwhile is admitted soon (0: off)
    header_timeout: float = 10.0      # seconds for a request's headers to arrive
    read_timeout: float = 30.0        # seconds for a request's body to arrive
    # drift detection over the embeddings of incoming inputs (lattice_engine.drift):
    # 0 = off, else the reference window W in 128..4096; a check every drift_every inputs
    drift_window: int = 0
    drift_every: int = 16
    drift_threshold: Optional[float] = None  # None: calibrated from the reference

    def __post_init__(self):
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"server.port = {self.port} is out of range: use 1..65535")
        if self.api_key is not None and not self.api_key.strip():
            # an empty key used to turn auth off without a word
            raise ConfigError("server.api_key (--api-key) is empty; give a key, or leave it "
                              "out to serve without authentication")
        if not (isinstance(self.prefill_step_seconds, (int, float)) and
                0 <= self.prefill_step_seconds <= 60):
            raise ConfigError(f"server.prefill_step_seconds = {self.prefill_step_seconds!r} "
                              f"is out of range: use 0 (off) or seconds up to 60")
        for name in ("header_timeout", "read_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 3600):
                raise ConfigError(f"server.{name} = {value!r} is out of range: use seconds "
                                  f"in (0, 3600]")
        if not (isinstance(self.drift_window, int) and
                (self.drift_window == 0 or 128 <= self.drift_window <= 4096)):
            raise ConfigError(f"server.drift_window = {self.drift_window!r} is out of range: "
                              f"use 0 (off) or 128..4096 observations")
        _at_least("server.drift_every", self.drift_every, 1)
        if self.drift_threshold is not None and not (
                isinstance(self.drift_threshold, (int, float)) and self.drift_threshold > 0):
            raise ConfigError(f"server.drift_threshold = {self.drift_threshold!r} must be a "
                              f"number > 0 (or unset: calibrated from the reference window)")
        _at_least("server.max_body_bytes", self.max_body_bytes, 1024)
        _at_least("server.max_concurrency", self.max_concurrency, 1)
        for name in ("kv_cache_tokens", "block_size", "max_running", "step_tokens",
                     "interleave_tokens"):
            _at_least(f"server.{name}", getattr(self, name), 1)
        if not (self.max_itl_rise == 0 or self.max_itl_rise > 1):
            raise ConfigError(f"server.max_itl_rise = {self.max_itl_rise!r} is out of range: "
                              f"use 0 (off) or a factor > 1")

    def batching_options(self):
        from .batching import BatchingOptions
        return BatchingOptions(kv_cache_tokens=self.kv_cache_tokens, block_size=self.block_size,
                               max_running=self.max_running, step_tokens=self.step_tokens,
                               interleave_tokens=self.interleave_tokens,
                               max_itl_rise=self.max_itl_rise,
                               prefill_step_seconds=self.prefill_step_seconds)


@dataclass(frozen=True)
class RaySection:
    """Replicas of the engine on Ray Serve behind one OpenAI endpoint (`lattice serve
    --replicas N`, the `ray` extra)."""
    replicas: int = 1                 # fixed replica count (when autoscaling is off)
    threads_per_replica: int = 1      # kernel threads (and Ray CPUs) of each replica
    min_replicas: Optional[int] = None  # autoscaling bounds: set both, or neither
    max_replicas: Optional[int] = None
    address: Optional[str] = None     # ray.init address; None: start a local cluster
    routing: str = "prefix"           # "prefix" (consistent hashing) or "round-robin"
    prefix_blocks: int = 4            # KV blocks hashed into a request's routing key
    max_imbalance: int = 4            # in-flight excess over the least loaded that
                                      # sends a request to the least loaded instead

    def __post_init__(self):
        _at_least("ray.replicas", self.replicas, 1)
        _at_least("ray.threads_per_replica", self.threads_per_replica, 1)
        if self.threads_per_replica > MAX_THREADS:
            raise ConfigError(f"ray.threads_per_replica = {self.threads_per_replica} is out of "
                              f"range: the kernels run at most {MAX_THREADS} threads")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError(f"ray.min_replicas = {self.min_replicas!r} and ray.max_replicas "
                              f"= {self.max_replicas!r}: autoscaling needs both bounds; set "
                              f"both, or neither for a fixed ray.replicas")
        if self.min_replicas is not None:
            _at_least("ray.min_replicas", self.min_replicas, 1)
            _at_least("ray.max_replicas", self.max_replicas, 1)
            if self.max_replicas < self.min_replicas:
                raise ConfigError(f"ray.max_replicas = {self.max_replicas} is below "
                                  f"ray.min_replicas = {self.min_replicas}; raise it to at "
                                  f"least {self.min_replicas}")
        if self.address is not None and not self.address.strip():
            raise ConfigError("ray.address (--ray-address) is empty; give the cluster's "
                              "address (e.g. ray://host:10001 or auto), or leave it out to "
                              "start a local cluster")
        _choice("ray.routing", self.routing, ("prefix", "round-robin"))
        _at_least("ray.prefix_blocks", self.prefix_blocks, 1)
        _at_least("ray.max_imbalance", self.max_imbalance, 0)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def max_count(self) -> int:
        """The most replicas this section can run at once."""
        return self.max_replicas if self.autoscaling else self.replicas


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    plugins: PluginsSection = field(default_factory=PluginsSection)
    server: ServerSection = field(default_factory=ServerSection)
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)
    inputs: InputsSection = field(default_factory=InputsSection)
    ray: RaySection = field(default_factory=RaySection)
    # sections the core does not define, kept as tables until `validate` finds the plugin
    # (a weight transform of that name) that owns them
    plugin_sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def override(self, section: str, **values: Any) -> "Config":
        """A copy with non-None values replaced in one section (CLI flags)."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        current = getattr(self, section)
        merged = {f.name: getattr(current, f.name) for f in fields(current)} | values
        return dataclasses.replace(self, **{section: _build(section, type(current), merged)})

    def validate(self, registry) -> None:
        """Check names that only the plugin registry knows (quant methods, formats,
        transforms, samplers, logits processors)."""
        from .quant.methods import missing_method_hint
        methods = registry.names("quant_methods")
        if self.quant.method is not None and self.quant.method not in methods:
            hint = missing_method_hint(self.quant.method)
            raise ConfigError(f"quant.method = {self.quant.method!r} is not a registered quant "
                              f"method; choices: {', '.join(sorted(methods))}{hint}")
        formats = registry.names("weight_formats")
        for pattern, fmt in self.quant.overrides.items():
            if fmt not in formats:
                raise ConfigError(f"quant.overrides[{pattern!r}] = {fmt!r} is not a registered "
                                  f"weight format; choices: {', '.join(sorted(formats))}")
        self.transform_settings(registry)
        self.adapter_settings(registry)
        if self.sampling.sampler and self.sampling.sampler not in registry.names("samplers"):
            raise ConfigError(f"sampling.sampler = {self.sampling.sampler!r} is not registered; "
                              f"choices: {', '.join(registry.names('samplers'))}")
        drafters = registry.names("drafters")
        if self.speculative.method is not None and self.speculative.method not in drafters:
            raise ConfigError(f"speculative.method = {self.speculative.method!r} is not a "
                              f"registered drafter; choices: "
                              f"{', '.join(sorted(drafters)) or '(none: pip install lattice-spec-decode)'}")
        from .sampling import BUILTIN_PROCESSORS
        plugin_processors = [n for n in registry.names("logits_processors")
                             if n not in BUILTIN_PROCESSORS]
        for name in self.sampling.processors:
            if name not in plugin_processors:
                raise ConfigError(
                    f"sampling.processors.{name} is not a logits processor a plugin registered "
                    f"(built-ins such as temperature are [sampling] keys of their own); "
                    f"registered by plugins: {', '.join(plugin_processors) or '(none)'}")

    def transform_settings(self, registry) -> dict[str, Any]:
        """name -> settings of every weight transform the config enables, in file order;
        a section no installed plugin owns is an error naming the choices."""
        transforms = registry.items.get("weight_transforms", {})
        enabled = {}
        for name, values in self.plugin_sections.items():
            if name in registry.items.get("adapters", {}):
                continue  # see adapter_settings
            if name not in transforms:
                core = ", ".join(CORE_SECTIONS)
                owned = ", ".join(sorted(set(transforms) | set(registry.names("adapters")))) \
                    or "(none installed)"
                raise ConfigError(f"unknown section [{name}]; core sections: {core}; plugin "
                                  f"sections: {owned}. If [{name}] belongs to a plugin, install "
                                  f"it (e.g. pip install lattice-{name})")
            settings = _build(name, transforms[name].settings, values)
            if settings.enabled:
                enabled[name] = settings
        return enabled

    def adapter_settings(self, registry) -> dict[str, AdapterSection]:
        """kind -> `AdapterSection` of every section named after an adapter kind."""
        kinds = registry.items.get("adapters", {})
        return {name: _build(name, AdapterSection, values)
                for name, values in self.plugin_sections.items() if name in kinds}


@dataclass(frozen=True)
class AdapterSection:
    """The section of an adapter kind ([lora]): adapters loaded by name at start, weighted
    mixtures of them, and optionally one merged into the weights for good."""

    adapters: Mapping[str, str] = field(default_factory=dict)
    mixtures: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    merge: Optional[str] = None

    def __post_init__(self):
        for name, path in self.adapters.items():
            if not isinstance(path, str) or not path:
                raise ConfigError(f"adapters.{name} = {path!r} must be the adapter's folder")
        for name, parts in self.mixtures.items():
            if not isinstance(parts, abc.Mapping) or not parts:
                raise ConfigError(f"mixtures.{name} must be a table adapter = weight")
            for part, weight in parts.items():
                if part not in self.adapters:
                    raise ConfigError(f"mixtures.{name}.{part}: no adapter {part!r} in "
                                      f"adapters (have: {', '.join(self.adapters) or 'none'})")
                if not isinstance(weight, (int, float)) or isinstance(weight, bool):
                    raise ConfigError(f"mixtures.{name}.{part} = {weight!r} must be a number")
        if self.merge is not None and self.merge not in self.adapters:
            raise ConfigError(f"merge = {self.merge!r} is not one of the adapters "
                              f"({', '.join(self.adapters) or 'none'})")


CORE_SECTIONS = tuple(f.name for f in fields(Config) if f.name != "plugin_sections")
SECTIONS = {name: f.type for f in fields(Config) for name in (f.name,) if name in CORE_SECTIONS}


def load_config(path: Optional[str | Path] = None) -> Config:
    """Read `path`, or ./lattice.toml when it exists, or return the defaults."""
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.exists():
            return Config()
        path = default
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    return config_from_dict(raw, str(path))


def config_from_dict(raw: Mapping[str, Any], where: str = "config") -> Config:
    hints = {k: v for k, v in get_type_hints(Config).items() if k in CORE_SECTIONS}
    plugin_sections = {}
    for name in raw:
        if name in hints:
            continue
        close = difflib.get_close_matches(name, hints, n=1, cutoff=0.75)
        if close or not isinstance(raw[name], dict):  # a typo, or a stray key: not a plugin's
            raise ConfigError(f"{where}: unknown section [{name}]; valid sections: "
                              f"{', '.join(hints)}" + (f" (did you mean [{close[0]}]?)"
                                                       if close else ""))
        plugin_sections[name] = dict(raw[name])  # checked against plugins by validate()
    sections: dict[str, Any] = {"plugin_sections": plugin_sections}
    for name, cls in hints.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {name} must be a table ([{name}]), got {values!r}")
        if name == "speculative":  # the drafter's own keys (prompt_lookup_max, model, ...)
            core = {f.name for f in fields(SpeculativeOptions)} - {"options"}
            values = {k: v for k, v in values.items() if k in core} | {
                "options": {k: v for k, v in values.items() if k not in core}}
        sections[name] = _build(name, cls, values, where)
    return Config(**sections)


def _build(section: str, cls: type, values: Mapping[str, Any], where: str = "config"):
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown key {section}.{key}; valid keys in "
                              f"[{section}]: {', '.join(valid)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except LatticeError as exc:  # e.g. SamplingParams range checks
        raise ConfigError(f"{where}: [{section}] {exc}") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _coerce(key, value, inner[0])
    if origin in (tuple, list):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} must be a list")
        return tuple(_coerce(key, v, args[0] if args else str) for v in items)
    # typing.Mapping[str, str] has origin collections.abc.Mapping, not typing.Mapping
    if origin in (dict, Mapping, abc.Mapping) or hint in (Mapping, abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} must be a table")
        return {str(k): _coerce(f"{key}.{k}", v, args[1] if args else str)
                for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (
            hint is not bool and isinstance(value, bool))):
        raise ConfigError(f"{key} = {value!r} must be of type {hint.__name__}")
    return value


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not valid; choices: {', '.join(choices)}")


def _at_least(key: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} = {value!r} is out of range: it must be an integer >= {low}")
