"""Sampling parameters, logits processors and samplers.

Processors are functions (token_ids, logits) -> logits, built from a parameter value by a
registered factory; samplers are functions logits -> token id built from a seeded RNG.
Both kinds are registered through the plugin hooks; the built-ins below use them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .errors import CheckpointError, RequestError

Processor = Callable[[Sequence[int], np.ndarray], np.ndarray]

# Bounds a request can reach: beyond them a value is a mistake (or an attack), not a setting.
MAX_TOKENS_LIMIT = 2**31 - 1   # far past any context; 10**30 would only overflow counters
SEED_LIMIT = 2**64             # numpy's generator takes any non-negative int; keep it 64-bit
MAX_TOP_LOGPROBS = 20          # alternatives reported per token (OpenAI's limit)
LOGIT_BIAS_LIMIT = 100.0       # |bias| OpenAI accepts
PENALTY_LIMIT = 2.0            # |presence_penalty|, |frequency_penalty| OpenAI accepts
LOGPROBS_MODES = ("raw", "processed")
_F32_MAX = float(np.finfo(np.float32).max)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 (the default, as in mlx-lm) means greedy. top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are
    off. `seed` makes sampling reproducible. `processors` carries values for logits
    processors that plugins registered, by name.

    OpenAI's additive adjustments run first, on the model's logits: `logit_bias` (token id
    -> bias in [-100, 100]) is added, and for each token j generated so far (the prompt does
    not count) `frequency_penalty * count[j] + presence_penalty * (count[j] > 0)` is
    subtracted. Then the processors (repetition_penalty, temperature, top_k, top_p, min_p,
    plugins) run in registration order.

    `logprobs` asks for that many most likely alternatives beside each sampled token's
    log-probability (0: the sampled token's only), `prompt_logprobs` the same for every
    prompt token but the first (served with the prompt computed again, not from the prefix
    cache). `logprobs_mode` "raw" (the default) reports the model's log-softmax before any
    sampling transform; "processed" reports the distribution actually sampled from (after
    bias, penalties, processors and an output constraint). max_tokens 0 generates nothing
    (with prompt_logprobs: score a text).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    sampler: Optional[str] = None
    processors: Mapping[str, Any] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logprobs_mode: str = "raw"

    def __post_init__(self) -> None:
        # every number must be finite: inf / NaN would poison the softmax of every step
        t, rp = self.temperature, self.repetition_penalty
        checks = [
            ("temperature", _finite(t) and t >= 0, "a finite number >= 0 (0 is greedy)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 is off)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 is off)"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p < 1, "in [0, 1) (0 is off)"),
            ("repetition_penalty", _finite(rp) and rp > 0, "a finite number > 0 (1 is off)"),
            ("max_tokens", _is_int(self.max_tokens) and
             (1 if self.prompt_logprobs is None else 0) <= self.max_tokens <= MAX_TOKENS_LIMIT,
             f"an integer in [1, {MAX_TOKENS_LIMIT}] (0 only with prompt_logprobs, to "
             f"score a prompt)"),
            ("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT),
             "an integer in [0, 2**64), or unset for a random seed"),
        ]
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            checks.append((name, _finite(value) and abs(value) <= PENALTY_LIMIT,
                           f"a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0 is off)"))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            checks.append((name, value is None or (_is_int(value) and
                                                   0 <= value <= MAX_TOP_LOGPROBS),
                           f"an integer in [0, {MAX_TOP_LOGPROBS}], or unset"))
        checks.append(("logprobs_mode", self.logprobs_mode in LOGPROBS_MODES,
                       f"one of {', '.join(LOGPROBS_MODES)}"))
        for name, ok, rule in checks:
            if not ok:
                raise RequestError(f"{name}={getattr(self, name)!r} is out of range: it must be {rule}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) for s in self.stop):
            raise RequestError(f"stop={self.stop!r} is invalid: each stop must be a string")
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids={tuple(self.stop_token_ids)!r} is invalid: "
                               f"each must be an integer token id")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = {}
        for token, value in dict(self.logit_bias).items():
            if isinstance(token, str) and token.isdigit():  # a JSON / TOML key
                token = int(token)
            if not _is_int(token) or token < 0:
                raise RequestError(f"logit_bias: key {token!r} is not a token id (an integer "
                                   f">= 0)")
            if not (_finite(value) and abs(value) <= LOGIT_BIAS_LIMIT):
                raise RequestError(f"logit_bias[{token}] = {value!r} is out of range: it must "
                                   f"be a number in [-{LOGIT_BIAS_LIMIT:g}, "
                                   f"{LOGIT_BIAS_LIMIT:g}]")
            bias[int(token)] = float(value)
        object.__setattr__(self, "logit_bias", bias)

    def with_overrides(self, **kwargs) -> "SamplingParams":
        """A copy with the given non-None fields replaced; unknown names are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise RequestError(f"unknown sampling option(s) {', '.join(unknown)}; valid: "
                               f"{', '.join(sorted(names))}")
        return replace(self, **{k: v for k, v in kwargs.items() if v is not None})


# --- built-in logits processors, in the order they run ------------------------------------

def repetition_penalty(value: float) -> Optional[Processor]:
    """CTRL-style: divide positive logits of seen tokens by value, multiply negative ones."""
    if value == 1.0:
        return None

    def apply(token_ids, logits):
        seen = np.unique(np.asarray(token_ids, dtype=np.int64))
        if seen.size:
            picked = logits[seen].astype(np.float64)
            with np.errstate(over="ignore", under="ignore"):
                penalised = np.where(picked > 0, picked / value, picked * value)
            # a tiny penalty (1e-40) would push a positive logit to +inf, and a softmax over
            # a row holding +inf is NaN: cap at the largest float32 instead (-inf from a
            # huge penalty is harmless: that token just cannot be drawn)
            logits[seen] = np.minimum(penalised, _F32_MAX).astype(np.float32)
        return logits
    return apply


def temperature(value: float) -> Optional[Processor]:
    if value in (0.0, 1.0):  # 0 is greedy, handled by the sampler choice
        return None

    def apply(token_ids, logits):
        # shift so the largest logit is 0 before dividing, in float64: every result is then
        # <= 0 and the top token stays exactly 0, so a tiny temperature (1e-40) gives -inf
        # for the rest (a one-hot softmax) instead of overflowing to inf - inf = NaN;
        # masked tokens (-inf) stay -inf
        x = logits.astype(np.float64)
        peak = np.max(x)
        if not np.isfinite(peak):
            return logits  # nothing finite to scale; the sampler reports the row
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            scaled = np.where(np.isneginf(x), -np.inf, (x - peak) / value)
            return scaled.astype(np.float32)  # below float32's range: -inf, as meant
    return apply


def top_k(value: int) -> Optional[Processor]:
    if value <= 0:
        return None

    def apply(token_ids, logits):
        if value >= logits.size:
            return logits
        kth = np.partition(logits, -value)[-value]
        return np.where(logits < kth, -np.inf, logits).astype(np.float32)
    return apply


def top_p(value: float) -> Optional[Processor]:
    if value >= 1.0:
        return None

    def apply(token_ids, logits):
        order = np.argsort(-logits, kind="stable")
        probs = _softmax(logits[order])
        # keep the smallest prefix whose mass reaches value, and always the top token
        cut = int(np.searchsorted(np.cumsum(probs), value)) + 1
        out = np.full_like(logits, -np.inf)
        keep = order[:cut]
        out[keep] = logits[keep]
        return out
    return apply


def min_p(value: float) -> Optional[Processor]:
    if value <= 0.0:
        return None

    def apply(token_ids, logits):
        probs = _softmax(logits)
        return np.where(probs < value * probs.max(), -np.inf, logits).astype(np.float32)
    return apply


BUILTIN_PROCESSORS: dict[str, Callable[[Any], Optional[Processor]]] = {
    "repetition_penalty": repetition_penalty,
    "temperature": temperature,
    "top_k": top_k,
    "top_p": top_p,
    "min_p": min_p,
}


# --- built-in samplers --------------------------------------------------------------------

def greedy(rng: np.random.Generator) -> Callable[[np.ndarray], int]:
    return lambda logits: int(np.argmax(logits))


def categorical_probabilities(logits: np.ndarray) -> np.ndarray:
    """float64 softmax of processed logits, as the categorical sampler draws from it."""
    x = logits.astype(np.float64)
    if np.isposinf(x).any():  # a plugin processor overflowed: share the mass among them
        x = np.where(np.isposinf(x), 0.0, -np.inf)
    return _softmax(x)


def categorical(rng: np.random.Generator) -> Callable[[np.ndarray], int]:
    def sample(logits):
        probs = categorical_probabilities(logits)
        return int(rng.choice(probs.size, p=probs))
    return sample


BUILTIN_SAMPLERS = {"greedy": greedy, "categorical": categorical}


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


class Sampler:
    """Turns one row of logits into the next token for one sequence."""

    def __init__(self, params: SamplingParams, processors: Mapping[str, Callable],
                 samplers: Mapping[str, Callable]):
        values = {f.name: getattr(params, f.name) for f in fields(params)}
        unknown = sorted(set(params.processors) - set(processors))
        if unknown:
            raise RequestError(f"unknown logits processor(s) {', '.join(unknown)}; registered: "
                               f"{', '.join(processors)}")
        values.update(params.processors)
        self.processors = [p for p in (factory(values[name]) for name, factory in
                                       processors.items() if name in values) if p is not None]
        name = params.sampler or ("greedy" if params.temperature == 0 else "categorical")
        if name not in samplers:
            raise RequestError(f"unknown sampler {name!r}; registered: {', '.join(samplers)}")
        self.rng = np.random.default_rng(params.seed)
        self.params = params
        self.name = name
        factory = samplers[name]
        self._kind = next((k for k, f in BUILTIN_SAMPLERS.items() if f is factory), "custom")
        self.pick = factory(self.rng)
        self.bias_ids = np.fromiter(params.logit_bias, np.int64, len(params.logit_bias))
        self.bias_values = np.fromiter(params.logit_bias.values(), np.float32,
                                       len(params.logit_bias))
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.processed: Optional[np.ndarray] = None  # the row the last token was drawn from
        self._top: Optional[int] = None  # its argmax, when process() found it (plain greedy)

    @property
    def kind(self) -> str:
        """What distribution `pick` draws from: "greedy" (the argmax of the processed
        logits), "categorical" (softmax of them, `probabilities`) or "custom" (a plugin
        sampler, whose distribution the engine cannot know: speculative decoding turns
        itself off for such a request)."""
        return self._kind

    def __call__(self, token_ids: Sequence[int], logits: np.ndarray,
                 prompt_len: int = 0) -> int:
        """The next token after token_ids, whose first prompt_len are the prompt (the
        presence and frequency penalties count only the tokens after it)."""
        processed = self.process(token_ids, logits, prompt_len)
        if self._top is not None and self._kind == "greedy":
            return self._top  # process() found the argmax on its way (plain greedy)
        return self.pick(processed)

    def process(self, token_ids: Sequence[int], logits: np.ndarray,
                prompt_len: int = 0) -> np.ndarray:
        """The logits `pick` draws from: a copy of one row after the logit bias, the
        presence / frequency penalties and every logits processor (repetition penalty,
        temperature, top-k / top-p / min-p, plugins'), checked; also kept as `processed`.
        Speculative decoding verifies drafts against exactly this row.

        With nothing to apply (plain greedy decoding, the common case) the row is not
        copied and one pass finds its argmax, which also checks it: argmax stops at the
        first NaN, so the value there is NaN or +inf exactly when max() would be (three
        passes over a 150k-vocabulary row were ~4% of an 8-stream step on Qwen2.5-0.5B)."""
        self._top = None
        if not (self.processors or self.bias_ids.size or self.presence or self.frequency):
            logits = np.asarray(logits, dtype=np.float32)
            top = int(np.argmax(logits))
            peak = logits[top]
            if not peak < np.inf:
                self._bad_logits(logits)
            if peak == -np.inf:
                raise RequestError("no token is left to sample: the output constraint and the "
                                   "sampling options removed every token")
            self._top = top
            self.processed = logits
            return logits
        logits = np.array(logits, dtype=np.float32, copy=True)
        # -inf is a masked token (a grammar); NaN or +inf can only come from a broken
        # checkpoint or kernel, and no token can be drawn from them honestly. One max()
        # per check: it is NaN if any value is (NaN propagates) and +inf if any value is,
        # where boolean masks would cost a full pass each over a 150k vocabulary, per row
        # and step (measured: ~5% of an 8-stream serving step on Qwen2.5-0.5B)
        if not np.max(logits) < np.inf:  # the checkpoint's fault, not the request's
            self._bad_logits(logits)
        if self.bias_ids.size:
            if self.bias_ids.max() >= logits.size:
                raise RequestError(f"logit_bias names token {int(self.bias_ids.max())}, "
                                   f"outside the vocabulary [0, {logits.size})")
            logits[self.bias_ids] += self.bias_values
        if self.presence or self.frequency:
            logits = openai_penalties(logits, token_ids[prompt_len:], self.presence,
                                      self.frequency)
        for process in self.processors:
            logits = process(token_ids, logits)
        peak = np.max(logits)
        if np.isnan(peak):
            raise RequestError("the sampling options turned the logits into NaN; use less "
                               "extreme values (temperature, repetition_penalty)")
        if peak == -np.inf:
            raise RequestError("no token is left to sample: the output constraint and the "
                               "sampling options removed every token")
        self.processed = logits
        return logits

    @staticmethod
    def _bad_logits(logits: np.ndarray):
        bad = int(np.count_nonzero(np.isnan(logits) | np.isposinf(logits)))
        raise CheckpointError(f"the model produced {bad} NaN or infinite logits at this "
                              f"step (a broken checkpoint or kernel); this request cannot "
                              f"continue")

    def probabilities(self, processed: np.ndarray) -> np.ndarray:
        """float64 [V]: the distribution `pick` samples from, given `process`'s row (one-hot
        at the argmax for greedy; the categorical sampler's softmax otherwise)."""
        if self._kind == "greedy":
            p = np.zeros(processed.size, np.float64)
            p[int(np.argmax(processed))] = 1.0
            return p
        if self._kind != "categorical":
            raise RequestError(f"sampler {self.name!r} is a plugin's: its distribution is "
                               f"unknown, so it cannot be verified against")
        return categorical_probabilities(processed)


def openai_penalties(logits: np.ndarray, generated: Sequence[int], presence: float,
                     frequency: float) -> np.ndarray:
    """OpenAI's formula: logits[j] - count[j] * frequency - (count[j] > 0) * presence, where
    count[j] is how often token j was generated so far."""
    if len(generated) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    logits[ids] -= (counts * frequency + presence).astype(np.float32)
    return logits


def make_sampler(params: SamplingParams, registry=None) -> Sampler:
    """A `Sampler` for params, using processors and samplers from the plugin registry."""
    if registry is None:
        from .plugins import get_plugin_manager
        registry = get_plugin_manager().registry
    return Sampler(params, registry.items.get("logits_processors", {}),
                   registry.items.get("samplers", {}))
