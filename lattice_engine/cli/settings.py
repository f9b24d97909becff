"""From parsed arguments to settings: the config file with the command line's overrides
(model, quant, sampling, plugin sampler and processors), the engine built from them, and
the output constraint flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def model_argument(args) -> Optional[str]:
    """The model given as the positional argument or as --model (not both, unless equal)."""
    from ..errors import ConfigError
    option = getattr(args, "model_option", None)
    if option is not None and args.model is not None and option != args.model:
        raise ConfigError(f"two models given: {args.model!r} and --model {option!r}; give one")
    return args.model if args.model is not None else option


def load_settings(args):
    from ..config import load_config
    config = load_config(args.config)
    config = config.override("model", path=model_argument(args), backend=args.backend,
                             threads=args.threads, kv_cache=getattr(args, "kv_cache", None))
    config = config.override("quant", method=args.quant, group_size=args.group_size)
    if hasattr(args, "temperature"):
        config = config.override(
            "sampling", max_tokens=args.max_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=tuple(args.stop) if args.stop else None, sampler=args.sampler,
            processors=processor_options(args.processor, config.sampling.processors),
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
            logit_bias=logit_bias_options(args.logit_bias, config.sampling.logit_bias))
    if getattr(args, "speculative", None) is not None and \
            args.speculative != config.speculative.method:
        # another drafter than the config's: its options are not the config's ones
        config = config.override("speculative", method=args.speculative, options={})
    config = config.override("speculative",
                             num_draft_tokens=getattr(args, "num_draft_tokens", None))
    return config


def logit_bias_options(given, configured) -> Optional[dict]:
    """--logit-bias ID=BIAS flags merged over `[sampling] logit_bias` (None: no flag)."""
    from ..errors import ConfigError
    if not given:
        return None
    out = dict(configured)
    for item in given:
        token, sep, bias = item.partition("=")
        try:
            out[int(token)] = float(bias)
        except ValueError:
            raise ConfigError(f"--logit-bias {item!r}: expected ID=BIAS with an integer token "
                              f"id and a number, e.g. --logit-bias 28=-100") from None
        if not sep:
            raise ConfigError(f"--logit-bias {item!r}: expected ID=BIAS")
    return out


def processor_options(given, configured) -> Optional[dict]:
    """--processor NAME=VALUE flags merged over `[sampling] processors` (None: no flag)."""
    from ..errors import ConfigError
    if not given:
        return None
    out = dict(configured)
    for item in given:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--processor {item!r}: expected NAME=VALUE, e.g. "
                              f"--processor ban_token=13")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def make_engine(args):
    from ..engine import Engine
    return Engine.from_config(load_settings(args))


def read_text_file(option: str, path: str) -> str:
    from ..errors import ConfigError
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path}: cannot read it as UTF-8 text ({exc})") from None


def output_constraint(args) -> dict:
    """The Engine keyword arguments for --json-schema / --regex / --grammar."""
    from ..errors import ConfigError
    if args.json_schema:
        try:
            schema = json.loads(read_text_file("--json-schema", args.json_schema))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--json-schema {args.json_schema}: not valid JSON ({exc})") \
                from None
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "cli", "schema": schema}}}
    if args.regex:
        return {"regex": args.regex}
    if args.grammar:
        return {"grammar": read_text_file("--grammar", args.grammar)}
    return {}


def require_tokenizer(engine, command: str) -> None:
    """Text in and out needs a tokenizer; a checkpoint of weights alone has none."""
    from ..errors import CheckpointError
    if engine.tokenizer is None:
        raise CheckpointError(f"{engine.loaded.name} has no tokenizer (tokenizer.json in an "
                              f"HF folder, tokenizer.ggml.* metadata in a GGUF), and `lattice "
                              f"{command}` needs one to read text: add the model's "
                              f"tokenizer.json to the folder")
