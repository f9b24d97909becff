"""Mixture-of-experts speed at Qwen3-30B-A3B's expert shapes (hidden 2048, 128 experts,
top-8, moe_intermediate 768, 32 query / 4 KV heads of 128) with few layers and random
weights: lattice next to llama.cpp on the same GGUF file, same run.

    python bench/moe.py [--layers 2] [--vocab 32768] [--quant q8_0 --quant q4_0]
                        [--threads 2] [--runs 3] [--streams 8] [--peer llama.cpp]
                        [--arch qwen3_moe | qwen3_5_moe]

--arch qwen3_5_moe measures Qwen3.5-MoE at Qwen3.5-35B-A3B's shapes instead (256 experts,
top-8, moe_intermediate 512, a shared expert, Gated DeltaNet and gated attention layers):
its files come from llama.cpp's own converter and quantizer, made once by
bench/qwen3_5_moe_gguf.py (which needs torch, transformers and a llama.cpp source tree);
--experts does not apply.

The GGUF (architecture qwen3moe, laid out as llama.cpp's converter lays it out: stacked
ffn_*_exps, F32 router) is written once, in its own process, by
lattice_engine.testing.moe_gguf into $LATTICE_HOME/bench/moe-<layers>L-v<vocab>-e<experts>-
<quant>.gguf. lattice loads it with the method that keeps the file's blocks as they are
(q8_0; for Q4_0 the q4 plugin's q4_sym, whose g32 layout is ggml's Q4_0 bytes), so the
experts are only re-laid (LATTICE_MAP_EXPERTS=1 keeps them memory-mapped). Prompts are
fixed pseudo-random token ids. Every engine runs in its own subprocess.
- decode tok/s by the slope method: T(N) = prefill a 16-token prompt + N greedy tokens;
  decode = (N2 - N1) / (T(N2) - T(N1)), medians of --runs.
- prefill tok/s: one 512-token prompt in one call, median of --runs.
- streams: --streams sequences decoding together through the paged (continuous-batching)
  step, aggregate tok/s, and its ratio to one stream through the same step.
- roofline: measured read bandwidth / the weight bytes one decoded token reads, counting a
  MoE layer's active experts only (models.moe.decode_weight_bytes).
- resident memory after the run: RSS, anonymous and file-mapped (the experts paged in).
Prints a table and the ratios, then one JSON line with provenance.
"""

from __future__ import annotations

import argparse
import zlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit, run_script  # bench/
# the dense Qwen3.5 bench's timing and llama.cpp worker (same prompt sizes)
from qwen3_5 import measure, token_ids, worker_llama_cpp  # noqa: E402

SHORT_PROMPT, PROMPT_TOKENS = 16, 512
GGML_TYPE = {"q8_0": "Q8_0", "q4_0": "Q4_0", "f16": "F16"}
# the lattice quant method that takes the file's blocks as they are: ggml's Q4_0 bytes are
# the q4 plugin's q4_sym_g32 layout (its `q4_0` method would re-quantize them)
METHOD = {"q8_0": "q8_0", "q4_0": "q4_sym", "f16": "f16"}


def scaled_config(layers: int, vocab: int, experts: int = 128) -> dict:
    return {"model_type": "qwen3_moe", "vocab_size": vocab, "hidden_size": 2048,
            "intermediate_size": 6144, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 4096, "num_experts": experts,
            "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False}


def random_tensor(config: dict, seed: int = 0):
    """tensor(hf_name) -> float32, random (a fixed seed per name), shaped as the config says."""
    h, e = config["hidden_size"], config["moe_intermediate_size"]
    hd, nq, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"q_proj": (nq * hd, h), "k_proj": (nkv * hd, h), "v_proj": (nkv * hd, h),
              "o_proj": (h, nq * hd), "q_norm": (hd,), "k_norm": (hd,),
              "input_layernorm": (h,), "post_attention_layernorm": (h,),
              "gate": (config["num_experts"], h), "gate_proj": (e, h), "up_proj": (e, h),
              "down_proj": (h, e)}

    def tensor(name: str) -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (config["vocab_size"], h)
        elif name == "model.norm.weight":
            shape = (h,)
        else:
            shape = shapes[name.split(".")[-2]]
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * (1.0 / np.sqrt(shape[1])))
    return tensor


def gguf_path(layers: int, vocab: int, experts: int, quant: str) -> Path:
    home = Path(os.environ.get("LATTICE_HOME") or "~/.cache/lattice").expanduser()
    return home / "bench" / f"moe-{layers}L-v{vocab}-e{experts}-{quant}.gguf"


def qwen3_5_moe_gguf(layers: int, vocab: int, quant: str) -> Path:
    """bench/qwen3_5_moe_gguf.py's file (llama.cpp's converter and quantizer), which must
    have been made."""
    from qwen3_5_moe_gguf import model_dir
    path = model_dir(layers, vocab) / f"{quant}.gguf"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: make it with python bench/qwen3_5_moe_gguf.py "
            f"--llama-cpp DIR --layers {layers} --vocab {vocab}")
    return path


def make_gguf(layers: int, vocab: int, experts: int, quant: str, arch: str = "qwen3_moe") -> Path:
    if arch == "qwen3_5_moe":
        return qwen3_5_moe_gguf(layers, vocab, quant)
    from lattice_engine.testing.moe_gguf import write_qwen3_moe_gguf
    path = gguf_path(layers, vocab, experts, quant)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        config = scaled_config(layers, vocab, experts)
        tmp = path.with_suffix(".tmp")
        write_qwen3_moe_gguf(tmp, config, random_tensor(config), GGML_TYPE[quant])
        os.replace(tmp, path)  # a half-written file never looks finished
    return path


def streams_tok_s(model, vocab: int, streams: int, steps: int, runs: int) -> float:
    """Aggregate decode tok/s of `streams` sequences stepping together through the paged
    (continuous-batching) forward, after a 16-token prefill each."""
    from lattice_engine.cache import SequenceBlocks
    from lattice_engine.models.paged_forward import PagedBatch

    def once() -> float:
        cache = model.make_paged_cache(num_blocks=streams * ((SHORT_PROMPT + steps) // 16 + 2),
                                       block_size=16, max_sequences=streams)
        seqs = []
        for s in range(streams):
            seq = SequenceBlocks()
            assert cache.reserve(seq, SHORT_PROMPT + steps)
            if cache.recurrent is not None:  # Qwen3.5-MoE: a recurrent-state slot each,
                seq.state_slot = cache.recurrent.acquire()  # as the scheduler gives
            seqs.append(seq)
        prompts = [token_ids(vocab, SHORT_PROMPT, seed=s) for s in range(streams)]
        logits = model.forward_paged(PagedBatch.build(
            cache, [(seqs[s], prompts[s], 0, True) for s in range(streams)]), cache)
        start = time.perf_counter()
        for i in range(steps):
            nxt = logits.argmax(-1)
            logits = model.forward_paged(PagedBatch.build(
                cache, [(seqs[s], [int(nxt[s])], SHORT_PROMPT + i, True)
                        for s in range(streams)]), cache)
        return time.perf_counter() - start

    once()  # warm-up
    return streams * steps / statistics.median([once() for _ in range(runs)])


def worker_lattice(path: str, quant: str, threads: int, runs: int, n1: int, n2: int,
                   streams: int) -> dict:
    from lattice_engine.generate import generate_step
    from lattice_engine.loading import load, set_threads
    from lattice_engine.models.moe import decode_weight_bytes, resident_memory_mb
    from lattice_engine.quant.methods import QuantSpec
    from lattice_engine.sampling import SamplingParams, make_sampler

    set_threads(threads)
    model = load(path, quant=QuantSpec(METHOD[quant]), backend="native").model
    loaded_mem = resident_memory_mb()
    vocab = model.config.vocab_size
    ids = token_ids(vocab, PROMPT_TOKENS)
    greedy = make_sampler(SamplingParams(temperature=0))

    def prefill_once() -> float:
        start = time.perf_counter()
        model.forward(np.asarray([ids]), model.make_cache(capacity=len(ids)), last_only=True)
        return time.perf_counter() - start

    def decode_n(n: int) -> float:
        start = time.perf_counter()
        for _ in generate_step(model, ids[:SHORT_PROMPT], greedy, max_tokens=n):
            pass
        return time.perf_counter() - start

    result = measure(prefill_once, decode_n, runs, n1, n2)
    one = streams_tok_s(model, vocab, 1, n2, runs)
    many = streams_tok_s(model, vocab, streams, n2, runs)
    mem = resident_memory_mb()
    result.update({
        "weight_bytes_per_token": decode_weight_bytes(model), "quant": quant,
        "fused_step": model._decode_step() is not None,
        "paged_1_stream_tok_s": one, f"paged_{streams}_streams_tok_s": many,
        "streams_vs_one": many / one, "file_mb": os.path.getsize(path) / 2 ** 20,
        "resident_after_load_mb": loaded_mem, "resident_mb": mem})
    return result


def run_worker(argv: list[str]) -> dict:
    return run_script(__file__, argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--experts", type=int, default=128,
                        help="experts per layer (128 is Qwen3-30B-A3B's; fewer for a smoke run)")
    parser.add_argument("--quant", action="append", choices=tuple(GGML_TYPE))
    parser.add_argument("--peer", action="append", choices=("llama.cpp", "none"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n1", type=int, default=8)
    parser.add_argument("--n2", type=int, default=40)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--arch", choices=("qwen3_moe", "qwen3_5_moe"), default="qwen3_moe")
    add_results_option(parser)
    parser.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = (args.threads, args.runs, args.n1, args.n2)

    if args.worker:
        if args.worker.startswith("make-gguf:"):  # its own process: the peak RSS of writing
            quant = args.worker.split(":", 1)[1]  # the file stays out of the workers' figures
            try:
                result = {"path": str(make_gguf(args.layers, args.vocab, args.experts, quant,
                                                args.arch))}
            except FileNotFoundError as exc:
                result = {"error": str(exc)}
        elif args.worker.startswith("lattice:"):
            result = worker_lattice(args.gguf, args.worker.split(":", 1)[1], *common,
                                    args.streams)
        else:
            result = worker_llama_cpp(args.gguf, *common)
        print(json.dumps(result))
        return 0

    base = ["--threads", str(args.threads), "--runs", str(args.runs), "--n1", str(args.n1),
            "--n2", str(args.n2), "--streams", str(args.streams)]
    results = {}
    peers = [p for p in (args.peer or ["llama.cpp"]) if p != "none"]
    for quant in args.quant or ["q8_0", "q4_0"]:
        made = run_worker(["--layers", str(args.layers), "--vocab", str(args.vocab),
                           "--experts", str(args.experts), "--arch", args.arch,
                           "--worker", f"make-gguf:{quant}"])
        if "error" in made:
            results[f"lattice {quant}"] = made
            continue
        path = made["path"]
        results[f"lattice {quant}"] = run_worker(base + ["--gguf", path, "--worker",
                                                         f"lattice:{quant}"])
        for peer in peers:
            results[f"{peer} {quant}"] = run_worker(base + ["--gguf", path, "--worker", peer])

    from lattice_engine import kernels
    kernels.set_threads(args.threads)
    bandwidth = kernels.measure_read_bandwidth()
    load = os.getloadavg()
    experts = 256 if args.arch == "qwen3_5_moe" else args.experts
    print(f"{args.arch} scaled: {args.layers} layers, {experts} experts, vocab {args.vocab}, "
          f"{args.threads} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, read bandwidth "
          f"{bandwidth:.1f} GB/s")
    print(f"{'engine':16s} {'decode tok/s':>13s} {'prefill tok/s':>14s} {'streams x':>10s} "
          f"{'RSS MB':>8s} {'roofline':>9s}")
    if args.arch == "qwen3_5_moe":
        from qwen3_5_moe_gguf import model_dir
        made_config = model_dir(args.layers, args.vocab) / "config.json"
        config = json.loads(made_config.read_text()) if made_config.exists() else None
    else:
        config = scaled_config(args.layers, args.vocab, args.experts)
    summary = {"arch": args.arch, "config": config,
               "threads": args.threads,
               "read_bandwidth_gb_s": bandwidth, "loadavg": load, "engines": results}
    for name, r in results.items():
        if "error" in r:
            print(f"{name:16s} error: {r['error']}")
            continue
        frac = streams = ""
        if "weight_bytes_per_token" in r:
            r["roofline_tok_s"] = bandwidth * 1e9 / r["weight_bytes_per_token"]
            r["roofline_frac"] = r["decode_tok_s"] / r["roofline_tok_s"]
            frac = f"{r['roofline_frac']:.0%}"
        if "streams_vs_one" in r:
            streams = f"{r['streams_vs_one']:.2f}"
        print(f"{name:16s} {r['decode_tok_s']:13.2f} {r['prefill_tok_s']:14.1f} {streams:>10s} "
              f"{r['peak_rss_mb']:8.0f} {frac:>9s}")
        peer = results.get(name.replace("lattice", "llama.cpp"), {})
        if name.startswith("lattice") and "decode_tok_s" in peer:
            r["decode_vs_llama_cpp"] = r["decode_tok_s"] / peer["decode_tok_s"]
            r["prefill_vs_llama_cpp"] = r["prefill_tok_s"] / peer["prefill_tok_s"]
            print(f"{name}: decode {r['decode_vs_llama_cpp']:.2f}x llama.cpp, prefill "
                  f"{r['prefill_vs_llama_cpp']:.2f}x")
        if "resident_mb" in r:
            print(f"{name}: resident after the run {json.dumps(r['resident_mb'])} MB "
                  f"(file {r['file_mb']:.0f} MB)")
    emit(summary, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
