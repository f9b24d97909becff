"""The `lattice` argument parser: every command's options, shared model and sampling
options, and `--version`."""

from __future__ import annotations

import argparse


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
    p.add_argument("--quant", default=None, help="quant method, e.g. f32, f16, q8_0, gguf (a "
                   ".gguf file's Q4_K / Q5_0 / Q6_K blocks as stored); plugins add more, e.g. "
                   "q4_asym from lattice-quant-q4")
    p.add_argument("--group-size", type=int, default=None,
                   help="group size of a grouped quant method (q4_sym / q4_asym: 32, 64, 128)")
    p.add_argument("--backend", default=None, choices=("auto", "native", "numpy"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kv-cache", default=None, choices=("auto", "f32", "f16", "q8_0"),
                   help="how the KV caches store keys and values: generate, ppl and serve "
                        "(default auto: f32 for float32 weights, f16 for any other format)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--presence-penalty", type=float, default=None,
                   help="OpenAI's presence penalty in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="OpenAI's frequency penalty in [-2, 2]")
    p.add_argument("--logit-bias", action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit; repeatable")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--sampler", default=None,
                   help="a registered sampler by name (`lattice plugins --all` lists them)")
    p.add_argument("--processor", action="append", default=None, metavar="NAME=VALUE",
                   help="enable a plugin's logits processor with a value (JSON, or a bare "
                        "string); repeatable")
    add_speculative_options(p)


def add_speculative_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", default=None, metavar="DRAFTER",
                   help="speculative decoding with a registered drafter (ngram, draft_model; "
                        "[speculative] in the config sets its options)")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="most draft tokens per verify (1..16, default 4)")


def version_text() -> str:
    """`lattice --version`: the engine, the plugin hook contract, the native kernels and the
    C plugin ABI (lattice_plugin.h) they offer."""
    from .. import PLUGIN_API_VERSION, __version__, kernels, native_plugin_abi
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
    gen.add_argument("--image", metavar="FILE", action="append", default=[],
                     help="an image (PNG, JPEG, WebP) placed before the prompt in the user "
                          "message; repeat for several (needs a vision model and plugin)")
    gen.add_argument("--adapter", metavar="DIR", default=None,
                     help="apply this adapter folder (a PEFT LoRA with lattice-lora "
                          "installed) to the generation; [lora] in the config loads named "
                          "ones for every command")
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
    serve.add_argument("--replicas", type=int, default=None,
                       help="serve N replicas of the engine on Ray Serve behind this one "
                            "endpoint, with prefix-aware routing (the `ray` extra; [ray] in "
                            "lattice.toml); starts a local Ray cluster unless --ray-address")
    serve.add_argument("--threads-per-replica", type=int, default=None,
                       help="kernel threads of each replica (default 1)")
    serve.add_argument("--ray-address", default=None,
                       help="an existing Ray cluster to run the replicas on (e.g. auto, "
                            "ray://host:10001)")
    serve.add_argument("--routing", default=None, choices=("prefix", "round-robin"),
                       help="how the replicas' ingress places requests (default prefix)")
    add_speculative_options(serve)
    serve.add_argument("--drift-window", type=int, default=None,
                       help="watch the embeddings of incoming inputs for drift: freeze the "
                            "first W (128..4096) as the reference, check every 16 "
                            "(/metrics: lattice_drift_*; default 0: off)")
    serve.add_argument("--drift-threshold", type=float, default=None,
                       help="the divergence that raises the drift alarm (default: "
                            "calibrated from the reference window)")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))

    embed = sub.add_parser("embed", help="embed texts (one per line) as JSON lines")
    add_model_options(embed, positional=True)
    embed.add_argument("texts", nargs="*", help="texts to embed (default: one per line from "
                                                "--file or stdin)")
    embed.add_argument("--file", default=None, help="UTF-8 file, one text per line ('-': stdin)")
    embed.add_argument("--dimensions", type=int, default=None,
                       help="keep the first N features (Matryoshka), re-normalised")
    embed.add_argument("--instruction", default=None,
                       help="text put before every input (e.g. a Qwen3-Embedding query "
                            "instruction)")
    embed.add_argument("--prompt-name", default=None,
                       help="one of the model's named prompts (config_sentence_transformers.json)")
    embed.add_argument("--truncate", action="store_true",
                       help="cut inputs longer than the model's limit instead of failing")
    embed.add_argument("--no-normalize", action="store_true",
                       help="skip the L2 normalisation the model asks for")

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
