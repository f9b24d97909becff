"""Sentence embeddings from any model: tokenize, run batched, pool, truncate, normalise.

Pooling (`Pooling`) is read from the sentence-transformers folder layout when the
checkpoint has it (`modules.json` naming a `Pooling` module and its `config.json`, a
`Normalize` module, `sentence_bert_config.json`'s `max_seq_length`,
`config_sentence_transformers.json`'s `prompts`); otherwise an encoder (BERT) pools by
mean and a decoder by its last token, both L2-normalised.

- mean: the average of the real tokens' hidden states (padding excluded).
- cls: the first token's ([CLS]; BGE).
- last: the last real token's; with left padding, as Qwen3-Embedding runs it, that is the
  last column. A decoder's causal attention makes left padding equal to no padding (a
  masked pad is never attended to, and RoPE depends on relative positions only), so
  decoders run each group of equal-length sequences as one unpadded batch: the same
  numbers without a mask the decoder forward does not take.
- max: the per-feature maximum over real tokens.

Encoders run right-padded batches with padded keys masked out (`contract.Encoder`);
sequences are sorted by length first so each batch pads little. `dimensions` truncates a
Matryoshka model's vector to its first `dimensions` features, then L2-normalises it when
the model normalises (OpenAI's `dimensions` semantics: unit vectors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import CheckpointError, ConfigError, RequestError

POOLING_MODES = ("mean", "cls", "last", "max")
# sentence-transformers' 1_Pooling/config.json keys -> our modes
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
             "pooling_mode_lasttoken": "last", "pooling_mode_max_tokens": "max"}

Inputs = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class Pooling:
    """How hidden states become one vector per input.

    mode: one of POOLING_MODES; normalize: L2-normalise the result; dimension: the pooled
    width (the model's hidden size); max_tokens: the longest input, in tokens, with the
    special tokens; prompts: named instruction prefixes (sentence-transformers' `prompts`,
    e.g. {"query": "Instruct: ...\\nQuery: "}); default_prompt: the one used when none is
    named (None: no prefix)."""

    mode: str
    normalize: bool
    dimension: int
    max_tokens: int
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise CheckpointError(f"pooling mode {self.mode!r} is not one of "
                                  f"{', '.join(POOLING_MODES)}")

    def prompt(self, name: Optional[str]) -> str:
        table = dict(self.prompts)
        if name is None:
            return table.get(self.default_prompt, "") if self.default_prompt else ""
        if name not in table:
            raise RequestError(f"prompt {name!r} is not one of this model's prompts "
                               f"({', '.join(table) or 'none'}); give the instruction text "
                               f"itself instead")
        return table[name]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON: {exc}") from exc
    return data


def read_pooling(folder: Optional[Path], *, encoder: bool, hidden_size: int,
                 max_positions: int) -> Pooling:
    """The pooling a checkpoint asks for (see the module docstring for the defaults)."""
    mode = "mean" if encoder else "last"
    normalize = True
    max_tokens = max_positions
    prompts: dict[str, str] = {}
    default_prompt = None
    folder = Path(folder) if folder is not None and Path(folder).is_dir() else None
    if folder is not None and (folder / "modules.json").exists():
        modules = _read_json(folder / "modules.json")
        if not isinstance(modules, list):
            raise CheckpointError(f"{folder / 'modules.json'} must hold a list of modules")
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules
                 if isinstance(m, dict)}
        normalize = "Normalize" in kinds
        if "Pooling" in kinds:
            cfg_path = folder / str(kinds["Pooling"].get("path", "")) / "config.json"
            cfg = _read_json(cfg_path) if cfg_path.exists() else {}
            chosen = [m for key, m in _ST_MODES.items() if cfg.get(key)]
            unknown = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v
                       and k not in _ST_MODES]
            if unknown or len(chosen) > 1:
                raise CheckpointError(f"{cfg_path}: pooling {', '.join(unknown + chosen)} is "
                                      f"not supported; supported: one of "
                                      f"{', '.join(_ST_MODES)}")
            if chosen:
                mode = chosen[0]
            if cfg.get("include_prompt", True) is False:
                raise CheckpointError(f"{cfg_path}: include_prompt = false (pooling that "
                                      f"skips the instruction's tokens) is not supported")
    if folder is not None and (folder / "sentence_bert_config.json").exists():
        sb = _read_json(folder / "sentence_bert_config.json")
        if isinstance(sb.get("max_seq_length"), int) and sb["max_seq_length"] > 0:
            max_tokens = min(max_tokens, sb["max_seq_length"])
    if folder is not None and (folder / "config_sentence_transformers.json").exists():
        st = _read_json(folder / "config_sentence_transformers.json")
        if isinstance(st.get("prompts"), dict):
            prompts = {str(k): str(v) for k, v in st["prompts"].items()}
        if isinstance(st.get("default_prompt_name"), str):
            default_prompt = st["default_prompt_name"]
    return Pooling(mode, normalize, hidden_size, max_tokens, tuple(prompts.items()),
                   default_prompt)


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pooled [B, H] float32 from hidden [B, T, H] and mask [B, T] (1 = real token).
    'last' takes each row's last real token, wherever the padding is."""
    m = mask.astype(bool)
    if mode == "mean":
        w = m.astype(np.float32)[..., None]
        return (np.sum(hidden * w, axis=1) / np.maximum(w.sum(axis=1), 1.0)).astype(np.float32)
    if mode == "cls":
        return np.ascontiguousarray(hidden[:, 0], dtype=np.float32)
    if mode == "last":
        t = hidden.shape[1]
        last = t - 1 - np.argmax(m[:, ::-1], axis=1)
        return np.ascontiguousarray(hidden[np.arange(hidden.shape[0]), last], dtype=np.float32)
    if mode == "max":
        return np.where(m[..., None], hidden, -np.inf).max(axis=1).astype(np.float32)
    raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of x scaled to unit L2 norm (a zero row stays zero), as torch's F.normalize."""
    norm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=-1, keepdims=True))
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class Embedder:
    """Embeddings from one loaded model: `tokenize` then `embed_ids`, or `embed`."""

    def __init__(self, model, tokenizer, pooling: Pooling, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.batch_size = batch_size
        self.encoder = callable(getattr(model, "encode", None))
        if tokenizer is not None:
            # a tokenizer.json may carry its own padding / truncation (all-MiniLM-L6-v2's
            # pads every input to 128): batching and limits are this class's job
            tokenizer.tokenizer.no_padding()
            tokenizer.tokenizer.no_truncation()

    @classmethod
    def for_loaded(cls, loaded, pooling: Optional[Pooling] = None) -> "Embedder":
        """Raises ConfigError when the model cannot embed: it has neither `encode` nor
        `hidden_states` + `make_cache`, or no `config.hidden_size`."""
        model = loaded.model
        cfg = model.config
        hidden = getattr(cfg, "hidden_size", None)
        encoder = callable(getattr(model, "encode", None))
        decoder = callable(getattr(model, "hidden_states", None)) and \
            callable(getattr(model, "make_cache", None))
        if not isinstance(hidden, int) or not (encoder or decoder):
            raise ConfigError(f"{type(model).__module__}.{type(model).__name__} cannot embed: "
                              f"it needs encode(tokens, mask) or hidden_states(tokens, cache) "
                              f"and an integer config.hidden_size")
        if pooling is None:
            source = loaded.checkpoint.source
            pooling = read_pooling(Path(source) if source else None,
                                   encoder=callable(getattr(model, "encode", None)),
                                   hidden_size=hidden,
                                   max_positions=int(getattr(cfg, "max_position_embeddings",
                                                             4096)))
        return cls(model, loaded.tokenizer, pooling)

    # ---- tokens ---------------------------------------------------------------------
    def tokenize(self, inputs: Inputs, *, prompt: Optional[str] = None,
                 instruction: Optional[str] = None, truncate: bool = False) -> list[list[int]]:
        """Token ids per input. `inputs`: a string, a list of strings, a list of token ids
        or a list of lists of ids (ids are used as given, without prefix). The prefix is
        `instruction` (text) or the model's prompt named `prompt` (or its default one).
        Inputs longer than `pooling.max_tokens` raise RequestError, or are cut to it when
        `truncate` (keeping the tokenizer's special tokens, as sentence-transformers)."""
        items = _as_items(inputs)
        if instruction is not None and prompt is not None:
            raise RequestError("give either a prompt name or an instruction, not both")
        prefix = instruction if instruction is not None else self.pooling.prompt(prompt)
        out = []
        limit = self.pooling.max_tokens
        vocab = self.model.config.vocab_size
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise RequestError(f"input {i} is an empty string; give some text")
                if self.tokenizer is None:
                    raise RequestError("this model has no tokenizer; give token ids")
                ids = self._encode(prefix + item, limit if truncate else None)
            else:
                ids = [int(t) for t in item]
                if any(t < 0 or t >= vocab for t in ids):
                    raise RequestError(f"input {i}: token ids must lie in 0..{vocab - 1}")
                if truncate:
                    ids = ids[:limit]
            if not ids:
                raise RequestError(f"input {i} is empty: each input needs at least one token")
            if len(ids) > limit:
                raise RequestError(f"input {i} has {len(ids)} tokens; this model embeds at "
                                   f"most {limit} (max_seq_length): shorten or split it")
            out.append(ids)
        return out

    def _encode(self, text: str, limit: Optional[int]) -> list[int]:
        tok = self.tokenizer.tokenizer
        if limit is None:
            return tok.encode(text).ids
        enc = tok.encode(text, add_special_tokens=False)
        enc.truncate(max(limit - tok.num_special_tokens_to_add(False), 0))
        return tok.post_process(enc).ids

    # ---- vectors --------------------------------------------------------------------
    def embed_ids(self, ids: Sequence[Sequence[int]], *, dimensions: Optional[int] = None,
                  normalize: Optional[bool] = None) -> np.ndarray:
        """float32 [len(ids), dimensions or hidden] embeddings of tokenized inputs."""
        self.check_dimensions(dimensions)
        return self.finish(self.pooled(ids), dimensions=dimensions, normalize=normalize)

    def check_dimensions(self, dimensions: Optional[int]) -> None:
        if dimensions is not None and not (isinstance(dimensions, int) and
                                           not isinstance(dimensions, bool) and
                                           1 <= dimensions <= self.pooling.dimension):
            raise RequestError(f"dimensions = {dimensions!r} must be an integer in "
                               f"1..{self.pooling.dimension} (the model's width)")

    def finish(self, pooled: np.ndarray, *, dimensions: Optional[int] = None,
               normalize: Optional[bool] = None) -> np.ndarray:
        """Pooled vectors truncated to `dimensions`, then L2-normalised if asked (default:
        as the model does)."""
        self.check_dimensions(dimensions)
        normalize = self.pooling.normalize if normalize is None else normalize
        out = pooled if dimensions is None else np.ascontiguousarray(pooled[:, :dimensions])
        return l2_normalize(out) if normalize else out.astype(np.float32, copy=True)

    def pooled(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled hidden states float32 [len(ids), hidden], before truncation and
        normalisation, in batches of `batch_size` (sorted by length)."""
        n = len(ids)
        out = np.empty((n, self.pooling.dimension), np.float32)
        order = sorted(range(n), key=lambda i: len(ids[i]))
        if self.encoder:
            for start in range(0, n, self.batch_size):
                chunk = order[start:start + self.batch_size]
                out[chunk] = self._encode_batch([ids[i] for i in chunk])
        else:  # a decoder: equal lengths together, no padding (see the module docstring)
            start = 0
            while start < n:
                length = len(ids[order[start]])
                end = start
                while end < n and end - start < self.batch_size and \
                        len(ids[order[end]]) == length:
                    end += 1
                chunk = order[start:end]
                out[chunk] = self._decoder_batch([ids[i] for i in chunk])
                start = end
        return out

    def _encode_batch(self, batch: list[Sequence[int]]) -> np.ndarray:
        t = max(len(s) for s in batch)
        tokens = np.zeros((len(batch), t), np.int64)
        mask = np.zeros((len(batch), t), np.int64)
        for r, s in enumerate(batch):
            tokens[r, :len(s)] = s
            mask[r, :len(s)] = 1
        hidden = self.model.encode(tokens, mask)
        return pool(hidden, mask, self.pooling.mode)

    def _decoder_batch(self, batch: list[Sequence[int]]) -> np.ndarray:
        tokens = np.asarray(batch, dtype=np.int64)
        cache = self.model.make_cache(batch=len(batch), capacity=tokens.shape[1])
        hidden = self.model.hidden_states(tokens, cache)
        return pool(hidden, np.ones(tokens.shape, np.int64), self.pooling.mode)

    def embed(self, inputs: Inputs, *, dimensions: Optional[int] = None,
              normalize: Optional[bool] = None, prompt: Optional[str] = None,
              instruction: Optional[str] = None, truncate: bool = False) -> np.ndarray:
        ids = self.tokenize(inputs, prompt=prompt, instruction=instruction, truncate=truncate)
        return self.embed_ids(ids, dimensions=dimensions, normalize=normalize)

    def with_pooling(self, **changes) -> "Embedder":
        """The same model with some pooling fields changed (mode, normalize, ...)."""
        return Embedder(self.model, self.tokenizer, replace(self.pooling, **changes),
                        self.batch_size)


def _as_items(inputs: Inputs) -> list:
    """A list of strings or of id lists, from any of the accepted input shapes."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    items = list(inputs)
    if not items:
        raise RequestError("no input to embed: give a string or a non-empty list")
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        return [items]  # one input given as token ids
    for i, x in enumerate(items):
        if isinstance(x, str):
            continue
        if isinstance(x, (list, tuple, np.ndarray)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in x):
            continue
        raise RequestError(f"input {i} must be a string or a list of token ids, not "
                           f"{type(x).__name__}")
    return items
