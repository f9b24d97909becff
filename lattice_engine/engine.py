"""`Engine`: a loaded model plus defaults, with generate / stream / chat entry points."""

from __future__ import annotations

import threading
from typing import Any, Iterator, Optional, Sequence, Union

from .config import Config, InputsSection
from .errors import ConfigError, RequestError
from .input_parts import has_images, split_images
from .multimodal import EncodedCache, MultimodalPrompt, expand_placeholders
from .generate import GenerationChunk, GenerationResult, generate, stream_generate
from .loading import LoadedModel, load
from .plugins import PluginManager, get_plugin_manager
from .quant.methods import QuantSpec
from .sampling import SamplingParams
from .speculative import Speculation, SpeculativeOptions

Prompt = Union[str, Sequence[int]]
# distinct speculative settings (drafter, k, options) one engine builds and keeps: requests
# choose them, so their number must be bounded
MAX_SPECULATIONS = 64


class Engine:
    """Generate text with one model.

    Example:
        engine = Engine.load("smollm2-135m")
        print(engine.chat([{"role": "user", "content": "Hi!"}], max_tokens=64).text)
    """

    def __init__(self, loaded: LoadedModel, *, sampling: SamplingParams = SamplingParams(),
                 plugin_manager: Optional[PluginManager] = None,
                 speculative: Optional[SpeculativeOptions] = None,
                 inputs: InputsSection = InputsSection()):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.sampling = sampling
        self.plugin_manager = plugin_manager or get_plugin_manager()
        self.input_limits = inputs.limits()
        self.encoded_cache = EncodedCache(inputs.encoded_cache)
        self._encoder = None
        self._encoder_lock = threading.Lock()  # the server prepares images in threads
        self._speculations: dict = {}
        # the default speculation of every request (built now, so bad options fail at load)
        self.speculative = speculative or SpeculativeOptions()
        self.speculation = self.speculation_for(self.speculative)

    def speculation_for(self, choice: Any = None):
        """The `speculative.Speculation` for a request's choice: None for the engine's
        default, False to turn it off, a `SpeculativeOptions` or a dict of its fields
        (method, num_draft_tokens, adaptive, options). Drafters are built once per distinct
        choice and reused."""
        if choice is None:
            return self.speculation
        if choice is False:
            return None
        if isinstance(choice, dict):
            unknown = sorted(set(choice) - {"method", "num_draft_tokens", "adaptive",
                                           "options"})
            if unknown:
                raise RequestError(f"unknown speculative field(s) {', '.join(unknown)}; "
                                   f"valid: method, num_draft_tokens, adaptive, options")
            base = self.speculative
            choice = SpeculativeOptions(
                method=choice.get("method", base.method),
                num_draft_tokens=choice.get("num_draft_tokens", base.num_draft_tokens),
                adaptive=choice.get("adaptive", base.adaptive),
                options=choice.get("options", base.options if choice.get(
                    "method", base.method) == base.method else {}))
        if not isinstance(choice, SpeculativeOptions):
            raise RequestError(f"speculative={choice!r} must be false, an object with "
                               f"method / num_draft_tokens, or unset")
        if not choice.enabled:
            return None
        key = (choice.method, choice.num_draft_tokens, choice.adaptive,
               repr(sorted(dict(choice.options).items())))
        if key not in self._speculations:
            if len(self._speculations) >= MAX_SPECULATIONS:
                raise RequestError(f"{MAX_SPECULATIONS} distinct speculative settings are in "
                                   f"use already, the most one engine keeps; use one of them "
                                   f"or the server's default")
            try:
                self._speculations[key] = Speculation.build(
                    self.plugin_manager.registry, choice, self.model, self.tokenizer)
            except ConfigError as exc:  # a request's bad choice is the request's error
                if choice is self.speculative:
                    raise
                raise RequestError(str(exc)) from exc
        return self._speculations[key]

    @classmethod
    def load(cls, model: str, *, quant: Optional[str] = None, backend: str = "auto",
             sampling: SamplingParams = SamplingParams(),
             plugin_manager: Optional[PluginManager] = None,
             speculative: Optional[SpeculativeOptions] = None) -> "Engine":
        """Load `model` (path or catalog name) quantized with method `quant`; None (the
        default) loads it as stored: a checkpoint written by `lattice quantize` keeps its
        formats, a GGUF file's Q8_0 / F16 / F32 matrices run as they are and a file mostly
        of other block types (Q4_K_M, ...) runs as q8_0 on the x86 kernels, float32 on the
        generic C and numpy (`loading.gguf_as_stored`); float
        GGUF files of other types and unquantized folders are float32."""
        pm = plugin_manager or get_plugin_manager()
        loaded = load(model, quant=QuantSpec(quant), backend=backend, plugin_manager=pm)
        return cls(loaded, sampling=sampling, plugin_manager=pm, speculative=speculative)

    @classmethod
    def from_config(cls, config: Config) -> "Engine":
        pm = get_plugin_manager(config.plugins.load)
        config.validate(pm.registry)
        if config.model.threads:
            from .loading import set_threads
            set_threads(config.model.threads)
        loaded = load(config.model.path, quant=QuantSpec(config.quant.method,
                                                          dict(config.quant.overrides),
                                                          config.quant.group_size),
                      backend=config.model.backend, plugin_manager=pm,
                      transforms=config.transform_settings(pm.registry),
                      kv_cache=config.model.kv_cache)
        engine = cls(loaded, sampling=config.sampling, plugin_manager=pm,
                     speculative=config.speculative, inputs=config.inputs)
        for kind, section in config.adapter_settings(pm.registry).items():
            engine.apply_adapter_section(kind, section)
        return engine

    def apply_adapter_section(self, kind: str, section) -> None:
        """Load the adapters of a config section ([lora]: `config.AdapterSection`), build
        its mixtures, and merge the one it names into the weights (then it is not resident:
        every request runs with it)."""
        from .adapters import merge
        for name, path in section.adapters.items():
            if name == section.merge:
                merge(self.model, self.adapters.kind(kind).load(path, self.model, name))
            else:
                self.load_adapter(path, name=name, kind=kind)
        for name, parts in section.mixtures.items():
            if section.merge in parts:
                raise ConfigError(f"[{kind}] mixtures.{name} uses {section.merge!r}, which "
                                  f"is merged into the weights; mix resident adapters only")
            self.adapters.mix(name, list(parts.items()))

    # ---- images (an encoder plugin, `register_encoders`) ---------------------------------
    @property
    def encoder(self):
        """The `LoadedInputEncoder` of the first registered image encoder that supports this
        checkpoint, loaded on first use. RequestError when none does."""
        with self._encoder_lock:
            return self._load_encoder()

    def _load_encoder(self):
        if self._encoder is None:
            config = self.loaded.checkpoint.config
            registry = self.plugin_manager.registry
            for name in registry.names("encoders"):
                candidate = registry.get("encoders", name)
                if candidate.modality == "image" and candidate.supports(config):
                    from .contract import check_loaded_encoder
                    loaded = candidate.load(self.loaded.checkpoint, self.input_limits)
                    check_loaded_encoder(name, loaded)
                    self._encoder = loaded
                    break
            else:
                encoders = ", ".join(registry.names("encoders")) or "none installed"
                raise RequestError(
                    f"this model (model_type {config.get('model_type')!r}) takes no images: "
                    f"no image encoder supports it (encoders: {encoders}); send text only, "
                    f"or serve a vision model (e.g. Qwen3.5 with lattice-vision installed)")
        return self._encoder

    def chat_prompt(self, messages: list[dict[str, Any]]
                    ) -> tuple[list[int], Optional[MultimodalPrompt]]:
        """Token ids of chat messages, and, when they hold images, the `MultimodalPrompt`
        (images decoded and preprocessed, not yet encoded) behind those ids."""
        if not has_images(messages):
            return self.prompt_ids(messages=messages), None
        encoder = self.encoder
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, which chat messages need")
        template_messages, images = split_images(messages, self.input_limits)
        prepared = [encoder.prepare(data) for data in images]
        ids = self.tokenizer.apply_chat_template(template_messages, add_generation_prompt=True)
        prompt = expand_placeholders(ids, encoder.placeholder_id, prepared)
        return prompt.tokens, prompt

    def _encoded_prompt(self, messages):
        """chat_prompt with every image encoded (through the encoded-image cache)."""
        ids, prompt = self.chat_prompt(messages)
        if prompt is not None:
            for i in prompt.unencoded():
                prompt.encode(i, self.encoded_cache.encode(self.encoder, prompt.inputs[i]))
        return ids, prompt

    def prompt_ids(self, prompt: Optional[Prompt] = None,
                   messages: Optional[list[dict[str, Any]]] = None) -> list[int]:
        """Token ids for a text prompt, a list of ids, or chat messages (via the template)."""
        if (prompt is None) == (messages is None):
            raise RequestError("give exactly one of prompt or messages")
        if messages is not None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    # ---- embeddings -------------------------------------------------------------------
    @property
    def embedder(self):
        """The model's `embedding.Embedder` (pooling read from the checkpoint folder)."""
        if getattr(self, "_embedder", None) is None:
            from .embedding import Embedder
            self._embedder = Embedder.for_loaded(self.loaded)
        return self._embedder

    def embed(self, texts, *, dimensions: Optional[int] = None,
              normalize: Optional[bool] = None, prompt: Optional[str] = None,
              instruction: Optional[str] = None, truncate: bool = False):
        """Embeddings float32 [n, dim] of `texts` (a string, a list of strings, token ids
        or lists of ids), pooled as the checkpoint says (see `lattice_engine.embedding`).

        dimensions: keep the first N features (Matryoshka), then re-normalise;
        normalize: override the model's L2 normalisation; prompt / instruction: a named
        prompt of the model or an instruction text put before every text; truncate: cut
        inputs longer than the model's limit instead of raising RequestError.
        """
        return self.embedder.embed(texts, dimensions=dimensions, normalize=normalize,
                                   prompt=prompt, instruction=instruction, truncate=truncate)

    @property
    def can_generate(self) -> bool:
        """False for an embedding-only model (an encoder such as BERT)."""
        from .contract import CAUSAL_LM_MEMBERS, missing_members
        return not missing_members(self.model, CAUSAL_LM_MEMBERS)

    def _require_generation(self) -> None:
        if not self.can_generate:
            raise ConfigError(f"{type(self.model).__module__} is an embedding-only model "
                              f"(an encoder): it cannot generate text; use Engine.embed / "
                              f"`lattice embed` / POST /v1/embeddings")

    @property
    def grammar_compiler(self):
        """The model's `lattice_engine.grammar.GrammarCompiler` (needs the grammar extra);
        a server passes it to `grammar_from_request` to validate a request up front."""
        from .grammar import grammar_compiler
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, which structured output needs")
        return grammar_compiler(self.tokenizer, self.model.vocab_size)

    def request_grammar(self, body: dict[str, Any]):
        """The output constraint of an OpenAI-style request body (`response_format`, `regex`,
        `grammar`), compiled and cached now so a bad one fails before streaming starts;
        None when the body asks for none (xgrammar is then not needed).

        Raises:
            RequestError: malformed fields, or a schema / grammar xgrammar rejects (HTTP 400).
            ConfigError: a constraint was asked for but the grammar extra is not installed.
        """
        from .grammar import grammar_from_request
        spec = grammar_from_request(body)
        if spec is not None:
            self.grammar_compiler.compile(spec)
        return spec

    def grammar_matcher(self, *, response_format: Optional[dict[str, Any]] = None,
                        regex: Optional[str] = None, grammar: Any = None):
        """A fresh matcher for the output constraint, or None when there is none.

        `response_format`, `regex` and `grammar` (EBNF text, or a `GrammarSpec`) mean what
        the request fields of the same names mean (see `grammar_from_request`).
        """
        if response_format is None and regex is None and grammar is None:
            return None
        from .grammar import GrammarSpec, grammar_from_request
        if isinstance(grammar, GrammarSpec):
            if response_format is not None or regex is not None:
                raise RequestError("give at most one output constraint; got a GrammarSpec "
                                   "and response_format/regex")
            spec = grammar
        else:
            spec = grammar_from_request({"response_format": response_format, "regex": regex,
                                         "grammar": grammar})
        return None if spec is None else self.grammar_compiler.matcher(spec)

    def stream(self, prompt: Optional[Prompt] = None, *,
               messages: Optional[list[dict[str, Any]]] = None,
               response_format: Optional[dict[str, Any]] = None, regex: Optional[str] = None,
               grammar: Any = None, speculative: Any = None, adapter: Optional[str] = None,
               **sampling: Any) -> Iterator[GenerationChunk]:
        """Yield text chunks as they are generated; sampling options override the defaults.
        response_format / regex / grammar constrain the output (see `grammar_matcher`);
        speculative picks speculative decoding for this call (see `speculation_for`);
        `adapter` names a loaded adapter (see `load_adapter`) applied to this request."""
        self._require_generation()
        params = self.sampling.with_overrides(**sampling)
        ids, images = self._encoded_prompt(messages) if messages is not None and \
            prompt is None else (self.prompt_ids(prompt, messages), None)
        matcher = self.grammar_matcher(response_format=response_format, regex=regex,
                                       grammar=grammar)
        speculation = self.speculation_for(speculative)
        if adapter is None:
            return stream_generate(self.model, self.tokenizer, ids, params,
                                   self.plugin_manager.registry, grammar=matcher,
                                   inputs=images, speculation=speculation)
        return self.adapters.stream_with(adapter, lambda: stream_generate(
            self.model, self.tokenizer, ids, params, self.plugin_manager.registry,
            grammar=matcher, inputs=images, speculation=speculation))

    def generate(self, prompt: Optional[Prompt] = None, *,
                 messages: Optional[list[dict[str, Any]]] = None,
                 response_format: Optional[dict[str, Any]] = None, regex: Optional[str] = None,
                 grammar: Any = None, speculative: Any = None, adapter: Optional[str] = None,
                 **sampling: Any) -> GenerationResult:
        """Generate to the end; sampling options (temperature, max_tokens, stop, seed, ...)
        override the engine's defaults for this call only. response_format / regex /
        grammar constrain the output (see `grammar_matcher`); speculative picks
        speculative decoding for this call (see `speculation_for`); `adapter` names a
        loaded adapter (see `load_adapter`) applied to this request."""
        self._require_generation()
        params = self.sampling.with_overrides(**sampling)
        ids, images = self._encoded_prompt(messages) if messages is not None and \
            prompt is None else (self.prompt_ids(prompt, messages), None)
        matcher = self.grammar_matcher(response_format=response_format, regex=regex,
                                       grammar=grammar)
        speculation = self.speculation_for(speculative)
        if adapter is None:
            return generate(self.model, self.tokenizer, ids, params,
                            self.plugin_manager.registry, grammar=matcher,
                            inputs=images, speculation=speculation)
        with self.adapters.using(adapter):
            return generate(self.model, self.tokenizer, ids, params,
                            self.plugin_manager.registry, grammar=matcher,
                            inputs=images, speculation=speculation)

    # ---- adapters (LoRA): several resident, chosen per request ---------------------------
    @property
    def adapters(self):
        """The `adapters.AdapterManager` of this engine (loaded adapters by name)."""
        mgr = getattr(self, "_adapters", None)
        if mgr is None:
            from .adapters import AdapterManager
            config = getattr(getattr(self.loaded, "checkpoint", None), "config", None) or {}
            if config.get("quarot"):
                raise RequestError("this model's weights are QuaRot-rotated: its linears see "
                                   "rotated inputs, so an adapter trained on the original "
                                   "model does not apply; load the model without [quarot] "
                                   "to use adapters")
            mgr = self._adapters = AdapterManager(self.model, self.plugin_manager.registry)
        return mgr

    def load_adapter(self, path, *, name: Optional[str] = None, kind: str = "lora") -> str:
        """Load the adapter files at `path` with the registered adapter kind `kind` and make
        them resident under `name` (default: the folder's name); returns the name."""
        return self.adapters.load(path, name=name, kind=kind)

    def adapt_adapter(self, name: str, example: Prompt, *, steps: int = 1,
                      **optimizer: Any) -> dict:
        """Train adapter `name` online on one example (text or token ids): `steps`
        optimizer steps of its kind's `train_step` (LoRA: next-token cross-entropy, SGD /
        Adam / AdamW with clipping; `optimizer` holds their settings, e.g. kind="adamw",
        lr=1e-3). The result becomes the adapter's new version; returns the losses."""
        ids = self.prompt_ids(example)
        return self.adapters.adapt(name, ids, optimizer, steps)

    def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter; requests already running with it finish with it."""
        self.adapters.unload(name)

    def chat(self, messages: list[dict[str, Any]], **sampling: Any) -> GenerationResult:
        """Reply to chat messages. A message's content may be a list of parts: text and
        images ({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        or {"type": "image", "image": png_bytes}), for a model an encoder plugin supports."""
        return self.generate(messages=messages, **sampling)

    # ---- continuous batching (many requests, one batched forward per step) ----------------
    def start_batching(self, options=None):
        """Create (or replace, if idle) the `BatchRunner` behind add_request / step / abort,
        with its paged KV pool sized by `options` (a `batching.BatchingOptions`)."""
        from .batching import BatchingOptions, BatchRunner
        from .contract import PAGED_MEMBERS, missing_members
        self._require_generation()
        lacking = missing_members(self.model, PAGED_MEMBERS)
        if lacking:
            raise ConfigError(
                f"{type(self.model).__module__}.{type(self.model).__name__} cannot be served "
                f"with continuous batching: it lacks {', '.join(lacking)} (see "
                f"lattice_engine.contract.PagedCausalLM); use `lattice generate` / "
                f"Engine.generate, which need only the CausalLM members")
        current = getattr(self, "_runner", None)
        if current is not None and current.has_unfinished():
            raise RequestError("cannot resize the KV pool while requests are running")
        self._runner = BatchRunner(self.model, self.tokenizer, self.plugin_manager.registry,
                                   options or BatchingOptions(), variant=self.model_variant,
                                   speculation=self.speculation)
        self._runner.encoded = self.encoded_cache
        return self._runner

    @property
    def runner(self):
        return getattr(self, "_runner", None) or self.start_batching()

    @property
    def model_variant(self) -> str:
        """Prefix-cache key of the weights in use: sequences of different variants never
        share KV blocks (a LoRA adapter plugin extends it with the adapter's identity)."""
        return f"{type(self.model).__name__}:{id(self.model)}"

    def add_request(self, prompt: Optional[Prompt] = None, *,
                    messages: Optional[list[dict[str, Any]]] = None,
                    request_id: Optional[str] = None, logits_mask=None,
                    speculative: Any = None, adapter: Optional[str] = None,
                    **sampling: Any) -> str:
        """Queue a request for `step`; returns its id. `logits_mask` (a
        `scheduler.LogitsMask`) constrains each next token, e.g. to a grammar;
        `speculative` picks its speculative decoding (see `speculation_for`); `adapter`
        names a loaded adapter the request runs with (the version current now, kept until
        the request ends)."""
        params = self.sampling.with_overrides(**sampling)
        if messages is not None and prompt is None:
            ids, images = self.chat_prompt(messages)
        else:
            ids, images = self.prompt_ids(prompt, messages), None
        held = self.adapter_for_request(adapter)
        try:
            seq = self.runner.make_sequence(ids, params, request_id=request_id,
                                            logits_mask=logits_mask, images=images,
                                            encoder=self._encoder if images else None,
                                            adapter=held,
                                            speculation=self.speculation_for(speculative))
            self.runner.enqueue(seq)
        except BaseException:
            if held is not None:
                held[2]()
            raise
        return seq.request_id

    def adapter_for_request(self, adapter: Optional[str]):
        """(slot, prefix-cache variant, release) for a request naming `adapter`, holding
        its current version until release() (None for no adapter)."""
        if adapter is None:
            return None
        slot, variant = self.adapters.acquire(adapter)
        released = []

        def release():
            if not released:
                released.append(True)
                self.adapters.release(slot)
        return slot, variant, release

    def step(self):
        """Run one batched forward; returns a list of `batching.RequestOutput`."""
        return self.runner.step()

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its KV blocks at once; False if unknown or done."""
        return self.runner.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.runner.has_unfinished()
