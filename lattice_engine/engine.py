"""`Engine`: a loaded model plus defaults, with generate / stream / chat entry points."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

from .config import Config
from .errors import RequestError
from .generate import GenerationChunk, GenerationResult, generate, stream_generate
from .loading import LoadedModel, load
from .plugins import PluginManager, get_plugin_manager
from .quant.methods import QuantSpec
from .sampling import SamplingParams

Prompt = Union[str, Sequence[int]]


class Engine:
    """Generate text with one model.

    Example:
        engine = Engine.load("smollm2-135m")
        print(engine.chat([{"role": "user", "content": "Hi!"}], max_tokens=64).text)
    """

    def __init__(self, loaded: LoadedModel, *, sampling: SamplingParams = SamplingParams(),
                 plugin_manager: Optional[PluginManager] = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.sampling = sampling
        self.plugin_manager = plugin_manager or get_plugin_manager()

    @classmethod
    def load(cls, model: str, *, quant: str = "f32", backend: str = "auto",
             sampling: SamplingParams = SamplingParams(),
             plugin_manager: Optional[PluginManager] = None) -> "Engine":
        """Load `model` (path or catalog name) quantized with method `quant`."""
        pm = plugin_manager or get_plugin_manager()
        loaded = load(model, quant=QuantSpec(quant), backend=backend, plugin_manager=pm)
        return cls(loaded, sampling=sampling, plugin_manager=pm)

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
                      backend=config.model.backend, plugin_manager=pm)
        return cls(loaded, sampling=config.sampling, plugin_manager=pm)

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

    def stream(self, prompt: Optional[Prompt] = None, *,
               messages: Optional[list[dict[str, Any]]] = None,
               **sampling: Any) -> Iterator[GenerationChunk]:
        """Yield text chunks as they are generated; sampling options override the defaults."""
        params = self.sampling.with_overrides(**sampling)
        return stream_generate(self.model, self.tokenizer, self.prompt_ids(prompt, messages),
                               params, self.plugin_manager.registry)

    def generate(self, prompt: Optional[Prompt] = None, *,
                 messages: Optional[list[dict[str, Any]]] = None,
                 **sampling: Any) -> GenerationResult:
        """Generate to the end; sampling options (temperature, max_tokens, stop, seed, ...)
        override the engine's defaults for this call only."""
        params = self.sampling.with_overrides(**sampling)
        return generate(self.model, self.tokenizer, self.prompt_ids(prompt, messages), params,
                        self.plugin_manager.registry)

    def chat(self, messages: list[dict[str, Any]], **sampling: Any) -> GenerationResult:
        return self.generate(messages=messages, **sampling)
