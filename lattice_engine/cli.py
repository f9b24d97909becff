"""`lattice` command line: generate | chat | serve | ppl | plugins | pull | models |
quantize.

Every user error is one line on stderr and exit code 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import LatticeError


def add_model_options(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="HF folder, .gguf file or catalog name (default: from the config)")
        # `--model PATH` works here too (with abbreviations on it read as `--model-name
        # PATH`, which served the default model under the name PATH)
        p.add_argument("--model", "-m", dest="model_option", default=None,
                       help="the same as the positional model")
    else:
        p.add_argument("--model", "-m", default=None,
                       help="HF folder, .gguf file or catalog name (default: smollm2-135m)")
    p.add_argument("--config", default=None, help="TOML config file (default: ./lattice.toml)")
    p.add_argument("--quant", default=None, help="quant method, e.g. f32, f16, q8_0 (plugins "
                   "add more, e.g. q4_asym from lattice-quant-q4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="group size of a grouped quant method (q4_sym / q4_asym: 32, 64, 128)")
    p.add_argument("--backend", default=None, choices=("auto", "native", "numpy"))
    p.add_argument("--threads", type=int, default=None)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--sampler", default=None,
                   help="a registered sampler by name (`lattice plugins --all` lists them)")
    p.add_argument("--processor", action="append", default=None, metavar="NAME=VALUE",
                   help="enable a plugin's logits processor with a value (JSON, or a bare "
                        "string); repeatable")


def version_text() -> str:
    """`lattice --version`: the engine, the plugin hook contract, the native kernels and the
    C plugin ABI (lattice_plugin.h) they offer."""
    from . import PLUGIN_API_VERSION, __version__, kernels, native_plugin_abi
    abi = native_plugin_abi()
    return (f"lattice-engine {__version__}\nplugin API {PLUGIN_API_VERSION}\n"
            f"native kernels {kernels.variant()}\n"
            f"C plugin ABI {abi if abi is not None else 'none (native kernels not built)'}")


class VersionAction(argparse.Action):
    """Like argparse's "version" action, but the text is built only when asked for: it
    loads the native module to name the kernel variant in use."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lattice", description="CPU LLM inference engine")
    parser.add_argument("--version", action=VersionAction,
                        help="print the engine version, the plugin API version and the "
                             "native kernel variant in use, then exit")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for a prompt")
    gen.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    gen.add_argument("--raw", action="store_true",
                     help="feed the prompt as is, without the model's chat template")
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    constraint = gen.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE", default=None,
                            help="constrain the output to this JSON schema (needs the "
                                 "grammar extra)")
    constraint.add_argument("--regex", metavar="R", default=None,
                            help="constrain the output to match this regex")
    constraint.add_argument("--grammar", metavar="FILE", default=None,
                            help="constrain the output to this EBNF grammar (root rule: root)")
    add_model_options(gen)
    add_sampling_options(gen)

    chat = sub.add_parser("chat", help="interactive chat that streams its answers")
    chat.add_argument("--system", default=None)
    add_model_options(chat)
    add_sampling_options(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    add_model_options(serve, positional=True)
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default 8000")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (or set LATTICE_API_KEY)")
    serve.add_argument("--model-name", default=None,
                       help="name clients use as 'model' (default: the model argument)")
    serve.add_argument("--kv-cache-tokens", type=int, default=None,
                       help="paged KV pool size in tokens (default 16384)")
    serve.add_argument("--max-running", type=int, default=None,
                       help="sequences batched at once (default 16)")
    serve.add_argument("--step-tokens", type=int, default=None,
                       help="tokens per forward when nothing decodes (default 512)")
    serve.add_argument("--interleave-tokens", type=int, default=None,
                       help="prefill tokens per forward while others decode (default 64)")
    serve.add_argument("--max-itl-rise", type=float, default=None,
                       help="keep decode steps within this factor of a decode-only step "
                            "while prefilling (default 2; 0 turns it off)")
    serve.add_argument("--max-concurrency", type=int, default=None)
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))

    ppl = sub.add_parser("ppl", help="perplexity of a text file (sliding windows)")
    add_model_options(ppl, positional=True)
    ppl.add_argument("--file", required=True, help="UTF-8 text file, e.g. WikiText-2 test")
    ppl.add_argument("--window", type=int, default=512)
    ppl.add_argument("--stride", type=int, default=256)
    ppl.add_argument("--max-tokens", type=int, default=None,
                     help="score only the first N tokens of the file")

    plugins = sub.add_parser("plugins", help="list installed plugins as JSON")
    plugins.add_argument("--all", action="store_true", help="include the built-in plugin")

    pull = sub.add_parser("pull", help="download a catalog model into the cache")
    pull.add_argument("name")

    sub.add_parser("models", help="list catalog models and what is cached")

    quantize = sub.add_parser("quantize", help="write a quantized checkpoint (safetensors + "
                                               "config with a quantization section)")
    quantize.add_argument("model", help="HF folder, .gguf file or catalog name")
    quantize.add_argument("--method", required=True, help="quant method, e.g. q8_0, q4_asym")
    quantize.add_argument("--group-size", type=int, default=None)
    quantize.add_argument("--override", action="append", default=[], metavar="GLOB=FORMAT",
                          help="per-tensor format (repeatable), e.g. 'lm_head.weight=f16'")
    quantize.add_argument("--out", required=True, help="output folder")
    # no abbreviations: `serve --model X` must never match `--model-name`, nor a prefix
    # any other option
    for p in [parser, *sub.choices.values()]:
        p.allow_abbrev = False
    return parser


def model_argument(args) -> Optional[str]:
    """The model given as the positional argument or as --model (not both, unless equal)."""
    from .errors import ConfigError
    option = getattr(args, "model_option", None)
    if option is not None and args.model is not None and option != args.model:
        raise ConfigError(f"two models given: {args.model!r} and --model {option!r}; give one")
    return args.model if args.model is not None else option


def load_settings(args):
    from .config import load_config
    config = load_config(args.config)
    config = config.override("model", path=model_argument(args), backend=args.backend,
                             threads=args.threads)
    config = config.override("quant", method=args.quant, group_size=args.group_size)
    if hasattr(args, "temperature"):
        config = config.override(
            "sampling", max_tokens=args.max_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=tuple(args.stop) if args.stop else None, sampler=args.sampler,
            processors=processor_options(args.processor, config.sampling.processors))
    return config


def processor_options(given, configured) -> Optional[dict]:
    """--processor NAME=VALUE flags merged over `[sampling] processors` (None: no flag)."""
    from .errors import ConfigError
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
    from .engine import Engine
    return Engine.from_config(load_settings(args))


def read_text_file(option: str, path: str) -> str:
    from .errors import ConfigError
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path}: cannot read it as UTF-8 text ({exc})") from None


def output_constraint(args) -> dict:
    """The Engine keyword arguments for --json-schema / --regex / --grammar."""
    from .errors import ConfigError
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
    from .errors import CheckpointError
    if engine.tokenizer is None:
        raise CheckpointError(f"{engine.loaded.name} has no tokenizer (tokenizer.json in an "
                              f"HF folder, tokenizer.ggml.* metadata in a GGUF), and `lattice "
                              f"{command}` needs one to read text: add the model's "
                              f"tokenizer.json to the folder")


def cmd_generate(args) -> int:
    constraint = output_constraint(args)
    engine = make_engine(args)
    require_tokenizer(engine, "generate")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    has_template = bool(engine.tokenizer.config.get("chat_template"))
    if args.raw or not has_template:
        stream = engine.stream(prompt, **constraint)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        stream = engine.stream(messages=messages + [{"role": "user", "content": prompt}],
                               **constraint)
    start = time.perf_counter()
    text, tokens, finish = [], 0, None
    for chunk in stream:
        text.append(chunk.text)
        tokens += len(chunk.tokens)
        finish = chunk.finish_reason or finish
        if not args.json:
            print(chunk.text, end="", flush=True)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"text": "".join(text), "tokens": tokens, "finish_reason": finish,
                          "seconds": round(seconds, 3)}))
    else:
        print()
        print(f"[{tokens} tokens, {tokens / seconds:.1f} tok/s, finish: {finish}]",
              file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    engine = make_engine(args)
    require_tokenizer(engine, "chat")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("lattice chat: an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for chunk in engine.stream(messages=messages):
            print(chunk.text, end="", flush=True)
            reply.append(chunk.text)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_ppl(args) -> int:
    from .eval.perplexity import perplexity
    from .errors import ConfigError
    engine = make_engine(args)
    require_tokenizer(engine, "ppl")
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--file {args.file}: cannot read it as UTF-8 text ({exc})") from None
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise ConfigError(f"--max-tokens {args.max_tokens} is too small: it must be >= 2")
        ids = ids[: args.max_tokens]
    print(f"model {engine.loaded.name}, quant {engine.loaded.quant}, {len(ids)} tokens, "
          f"window {args.window}, stride {args.stride}")

    def progress(done, total):
        print(f"\rwindow {done}/{total}", end="", file=sys.stderr, flush=True)

    result = perplexity(engine.model, ids, window=args.window, stride=args.stride,
                        progress=progress)
    print(file=sys.stderr)
    result.update(model=engine.loaded.name, quant=engine.loaded.quant, file=str(path))
    print(f"perplexity {result['ppl']:.4f} over {result['scored']} scored tokens "
          f"({result['seconds']} s)")
    print(json.dumps(result))
    return 0


def cmd_serve(args) -> int:
    import os
    from .engine import Engine
    from .server import serve
    config = load_settings(args)
    config = config.override("server", host=args.host, port=args.port,
                             api_key=args.api_key if args.api_key is not None else
                             (os.environ.get("LATTICE_API_KEY") or None),
                             model_name=args.model_name, kv_cache_tokens=args.kv_cache_tokens,
                             max_running=args.max_running, step_tokens=args.step_tokens,
                             interleave_tokens=args.interleave_tokens,
                             max_itl_rise=args.max_itl_rise,
                             max_concurrency=args.max_concurrency)
    engine = Engine.from_config(config)
    name = config.server.model_name or config.model.path
    print(f"lattice serve: {name} on http://{config.server.host}:{config.server.port}/v1 "
          f"(KV pool {config.server.kv_cache_tokens} tokens)", file=sys.stderr)
    serve(engine, model_name=name, settings=config.server,
          options=config.server.batching_options(), log_level=args.log_level)
    return 0


def cmd_plugins(args) -> int:
    from .plugins import get_plugin_manager
    pm = get_plugin_manager()
    pm.registry  # built here so a name clash or a broken registration is an error (exit 2)
    print(json.dumps(pm.describe(include_builtins=args.all), indent=2))
    return 0


def cmd_pull(args) -> int:
    from .io.catalog import pull
    path = pull(args.name)
    print(path)
    return 0


def cmd_models(args) -> int:
    from .io.catalog import CATALOG, cached_models
    cached = {m["name"]: m for m in cached_models()}
    for name in CATALOG:
        entry = cached.get(name)
        where = f"cached at {entry['path']} ({entry['size'] / 1e6:.0f} MB)" if entry else \
            "not cached (lattice pull " + name + ")"
        print(f"{name:24s} {where}")
    return 0


def cmd_quantize(args) -> int:
    from .config import config_from_dict
    from .errors import ConfigError
    from .plugins import get_plugin_manager
    from .quant.methods import QuantSpec
    from .quantize import quantize_checkpoint
    overrides = {}
    for item in args.override:
        pattern, sep, fmt = item.partition("=")
        if not sep or not pattern or not fmt:
            raise ConfigError(f"--override {item!r} must look like GLOB=FORMAT, e.g. "
                              f"'lm_head.weight=f16'")
        overrides[pattern] = fmt
    config = config_from_dict({"quant": {"method": args.method, "overrides": overrides,
                                         **({"group_size": args.group_size}
                                            if args.group_size is not None else {})}})
    pm = get_plugin_manager()
    config.validate(pm.registry)
    start = time.perf_counter()
    summary = quantize_checkpoint(args.model, args.out, QuantSpec(args.method, overrides,
                                                                  args.group_size), pm)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary))
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "ppl": cmd_ppl,
            "plugins": cmd_plugins, "pull": cmd_pull, "models": cmd_models,
            "quantize": cmd_quantize}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LatticeError as exc:
        print(f"lattice: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
