"""One function per `lattice` command: `cmd_<name>(args) -> exit code`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import RequestError
from .settings import load_settings, make_engine, output_constraint, require_tokenizer


def read_image_file(path: str) -> bytes:
    """The bytes of an image named on the command line (the user's own file: no folder
    restriction applies, unlike file: URLs in server requests)."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RequestError(f"--image {path}: cannot read it ({exc.strerror})") from None


def cmd_generate(args) -> int:
    constraint = output_constraint(args)
    engine = make_engine(args)
    require_tokenizer(engine, "generate")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.adapter:
        constraint["adapter"] = engine.load_adapter(args.adapter)
    has_template = bool(engine.tokenizer.config.get("chat_template"))
    images = [read_image_file(path) for path in getattr(args, "image", None) or []]
    if images and (args.raw or not has_template):
        raise RequestError("--image needs the model's chat template (it places the image "
                           "in the user message); drop --raw")
    if args.raw or not has_template:
        stream = engine.stream(prompt, **constraint)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        content = prompt if not images else \
            [{"type": "image", "image": data} for data in images] + \
            [{"type": "text", "text": prompt}]
        stream = engine.stream(messages=messages + [{"role": "user", "content": content}],
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
    from ..eval.perplexity import leading_tokens, perplexity
    from ..errors import ConfigError
    engine = make_engine(args)
    require_tokenizer(engine, "ppl")
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--file {args.file}: cannot read it as UTF-8 text ({exc})") from None
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError(f"--max-tokens {args.max_tokens} is too small: it must be >= 2")
    ids = leading_tokens(lambda t: engine.tokenizer.encode(t, add_special_tokens=False), text,
                         args.max_tokens)
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
    from ..config import RaySection
    from ..engine import Engine
    from ..server import serve
    config = load_settings(args)
    config = config.override("server", host=args.host, port=args.port,
                             api_key=args.api_key if args.api_key is not None else
                             (os.environ.get("LATTICE_API_KEY") or None),
                             model_name=args.model_name, kv_cache_tokens=args.kv_cache_tokens,
                             max_running=args.max_running, step_tokens=args.step_tokens,
                             interleave_tokens=args.interleave_tokens,
                             max_itl_rise=args.max_itl_rise,
                             max_concurrency=args.max_concurrency,
                             drift_window=args.drift_window,
                             drift_threshold=args.drift_threshold)
    config = config.override("ray", replicas=args.replicas,
                             threads_per_replica=args.threads_per_replica,
                             address=args.ray_address, routing=args.routing)
    if args.replicas is not None or args.ray_address is not None or \
            config.ray != RaySection():
        from ..errors import ConfigError
        from ..server import ray_serve
        if args.threads is not None:
            raise ConfigError(f"--threads {args.threads} sets one engine's threads; with "
                              f"replicas use --threads-per-replica (or [ray] "
                              f"threads_per_replica)")
        section = config.ray
        count = (f"{section.min_replicas}..{section.max_replicas} (autoscaled)"
                 if section.autoscaling else str(section.replicas))
        print(f"lattice serve: {config.server.model_name or config.model.path}, {count} "
              f"replicas x {section.threads_per_replica} threads on Ray Serve "
              f"({section.address or 'a local cluster'}), {section.routing} routing, on "
              f"http://{config.server.host}:{config.server.port}/v1", file=sys.stderr)
        ray_serve.start(config, log_level=args.log_level)
        return 0
    engine = Engine.from_config(config)
    name = config.server.model_name or config.model.path
    print(f"lattice serve: {name} on http://{config.server.host}:{config.server.port}/v1 "
          f"(KV pool {config.server.kv_cache_tokens} tokens)", file=sys.stderr)
    serve(engine, model_name=name, settings=config.server,
          options=config.server.batching_options(), log_level=args.log_level)
    return 0


def cmd_embed(args) -> int:
    """One JSON line per input: {"index", "tokens", "embedding"}."""
    from ..errors import ConfigError
    texts = list(args.texts)
    if args.file is not None:
        if texts:
            raise ConfigError("give texts as arguments or --file, not both")
        try:
            raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--file {args.file}: cannot read it as UTF-8 text ({exc})") from None
        texts = [line for line in raw.splitlines() if line.strip()]
    elif not texts:
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise ConfigError("nothing to embed: give texts, --file FILE, or lines on stdin")
    engine = make_engine(args)
    embedder = engine.embedder
    ids = embedder.tokenize(texts, prompt=args.prompt_name, instruction=args.instruction,
                            truncate=args.truncate)
    vectors = embedder.embed_ids(ids, dimensions=args.dimensions,
                                 normalize=False if args.no_normalize else None)
    for i, (v, t) in enumerate(zip(vectors, ids)):
        print(json.dumps({"index": i, "tokens": len(t),
                          "embedding": [float(x) for x in v]}))
    return 0


def cmd_plugins(args) -> int:
    from ..plugins import get_plugin_manager
    pm = get_plugin_manager()
    pm.registry  # built here so a name clash or a broken registration is an error (exit 2)
    print(json.dumps(pm.describe(include_builtins=args.all), indent=2))
    return 0


def cmd_pull(args) -> int:
    from ..io.catalog import pull
    path = pull(args.name)
    print(path)
    return 0


def cmd_models(args) -> int:
    from ..io.catalog import CATALOG, cached_models
    cached = {m["name"]: m for m in cached_models()}
    for name in CATALOG:
        entry = cached.get(name)
        where = f"cached at {entry['path']} ({entry['size'] / 1e6:.0f} MB)" if entry else \
            "not cached (lattice pull " + name + ")"
        print(f"{name:24s} {where}")
    return 0


def cmd_quantize(args) -> int:
    from ..config import config_from_dict
    from ..errors import ConfigError
    from ..plugins import get_plugin_manager
    from ..quant.methods import QuantSpec
    from ..quantize import quantize_checkpoint
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
