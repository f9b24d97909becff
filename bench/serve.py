"""Serving benchmark: `lattice serve` in a subprocess, driven over HTTP.

    python bench/serve.py --model qwen2.5-coder-0.5b --quant q8_0 [--streams 1,8]

Measures, on one server:
- decode throughput at each stream count: N concurrent streaming completions of
  --gen-tokens tokens each (ignore_eos), aggregate tok/s over the window in which all N
  are decoding (after the last first token, before the first last token);
- time to first token of a request whose --prefix-tokens-token prefix is cold, then of a
  second request sharing that prefix (prefix-cache hit), median of --repeats salted pairs;
- inter-token latency of --itl-streams running streams before and while a
  --long-prompt-token prompt is prefilled in chunks, and that prompt's time to first token
  against a prompt of the same length on the idle server (other text, so no prefix hit).
Prints one line per figure, then (as its very last line) one JSON object.

    python bench/serve.py --replicas 2 [--routing prefix|round-robin|both]

runs `lattice serve --replicas` (Ray Serve, the `ray` extra) instead and measures:
- prefix routing: --groups groups of --group-size requests, each group sharing a
  --group-prefix-tokens-token prefix (cold: salted per run), sent one at a time in a
  shuffled order; the share of the second-and-later requests of each group whose prompt
  was served from a replica's prefix cache (the response's usage.prompt_tokens_details.
  cached_tokens covering the shared prefix's full blocks; the replicas' /metrics hit
  tokens printed beside), under prefix routing and under round-robin;
- aggregate decode throughput at --streams of N replicas x --threads threads against 1
  replica x N*threads threads (both on Ray Serve, same ingress), prompts shorter than one
  KV block so placement is by load alone.

The streams are read with the standard library (one JSON parse per server-sent event), not
the openai client: its per-chunk model objects cost ~0.3 ms of Python each, and on a
2-core machine eight client threads doing that take a core's worth of time from the server
being measured (the tests drive the server with the openai client). --client openai
measures through it anyway.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from provenance import add_results_option, emit, peak_rss_mb  # bench/, next to this file

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_tokenizer(model: str):
    """The model's tokenizer (catalog name, .gguf file or HF folder) without its weights,
    so prompts are sent as token ids of exact lengths."""
    from tokenizers import Tokenizer
    path = Path(model)
    if not path.exists():
        from lattice_engine.io.catalog import pull
        path = Path(pull(model, quiet=True))
    if path.is_dir():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    from lattice_engine.io.gguf_file import read_gguf
    from lattice_engine.io.gguf_tokenizer import build_tokenizer
    return build_tokenizer(read_gguf(path)[0], str(path))


class Server:
    def __init__(self, args, replicas: int | None = None, threads: int | None = None,
                 routing: str = "prefix"):
        """`lattice serve` of args.model; with `replicas`, that many replicas of `threads`
        threads each on Ray Serve (a local cluster of the subprocess's own)."""
        self.port = free_port()
        threads = threads or args.threads
        cmd = [sys.executable, "-m", "lattice_engine.cli", "serve", args.model,
               "--quant", args.quant, "--port", str(self.port),
               "--kv-cache-tokens", str(args.kv_cache_tokens),
               "--max-running", str(max(args.streams + [args.itl_streams]) + 2),
               "--step-tokens", str(args.step_tokens),
               "--interleave-tokens", str(args.interleave_tokens),
               "--max-itl-rise", str(args.max_itl_rise), "--log-level", "warning"]
        if replicas is None:
            cmd += ["--threads", str(threads)]
        else:
            cmd += ["--replicas", str(replicas), "--threads-per-replica", str(threads),
                    "--routing", routing]
        self.proc = subprocess.Popen(cmd)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start: {' '.join(cmd)}")
                time.sleep(0.5)
        while replicas is not None:  # /health answers once one replica is up: wait for all
            listed = json.loads(urllib.request.urlopen(self.base + "/internal/replicas",
                                                       timeout=30).read())["replicas"]
            if len(listed) >= replicas:
                break
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{len(listed)} of {replicas} replicas started: "
                                 f"{' '.join(cmd)}")
            time.sleep(1)
        self.client = None
        if args.client == "openai":
            import openai
            self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none",
                                        max_retries=0, timeout=1200)
        self.model = args.model

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.base + "/metrics", timeout=10).read().decode()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                         if line and not line.startswith("#"))}

    def metric_by_replica(self, name: str) -> dict[str, float]:
        """A metric of the replicas behind a Ray Serve ingress, by replica label."""
        return {k.split('replica="')[1].split('"')[0]: v for k, v in self.metrics().items()
                if k.startswith(name + "{")}

    def complete(self, prompt_ids, max_tokens: int = 1) -> dict:
        """One non-streaming completion: its JSON response."""
        body = json.dumps({"model": self.model, "prompt": list(prompt_ids),
                           "max_tokens": max_tokens, "temperature": 0})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1200)
        try:
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
            return json.loads(data)
        finally:
            conn.close()

    def stream(self, prompt_ids, max_tokens: int, stamps: list, start: threading.Event = None):
        """One streaming completion; appends the arrival time of each token chunk."""
        if start is not None:
            start.wait()
        if self.client is not None:
            for chunk in self.client.completions.create(
                    model=self.model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0,
                    stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
            return
        body = json.dumps({"model": self.model, "prompt": list(prompt_ids),
                           "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "ignore_eos": True})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1200)
        try:
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
            for line in resp:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                choices = json.loads(line[6:]).get("choices")
                if choices and choices[0].get("text"):
                    stamps.append(time.perf_counter())
        finally:
            conn.close()

    def stop(self) -> float | None:
        """Stop the server; returns its peak RSS in MB (None where it cannot be read; with
        replicas, the driver's alone)."""
        peak = peak_rss_mb(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)  # with replicas: it stops its Ray cluster first
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return peak


def corpus_ids(tok, n_tokens: int, offset: int = 0) -> list[int]:
    text = WIKITEXT.read_text(encoding="utf-8")
    start = offset * 997 % (len(text) // 2)
    ids = tok.encode(text[start:start + n_tokens * 8]).ids
    if len(ids) < n_tokens:
        raise SystemExit(f"WikiText-2 slice too short for {n_tokens} tokens")
    return ids[:n_tokens]


def throughput(server: Server, tok, streams: int, gen_tokens: int,
               prompt_tokens: int = 32) -> dict:
    prompts = [corpus_ids(tok, prompt_tokens, offset=100 + i) for i in range(streams)]
    stamps = [[] for _ in range(streams)]
    go = threading.Event()
    threads = [threading.Thread(target=server.stream, args=(p, gen_tokens, s, go))
               for p, s in zip(prompts, stamps)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    t0 = max(s[0] for s in stamps)            # every stream is decoding from here ...
    t1 = min(s[-1] for s in stamps)           # ... until the first one ends
    count = sum(sum(1 for x in s if t0 < x <= t1) for s in stamps)
    # the window can be empty when late arrivals are still prefilling as the first ends;
    # the overall figure counts every token after each stream's first over the whole span
    window = round(count / (t1 - t0), 2) if t1 > t0 and count >= 2 * streams else None
    span = max(s[-1] for s in stamps) - min(s[0] for s in stamps)
    overall = round(sum(len(s) - 1 for s in stamps) / span, 2)
    per = statistics.median((len(s) - 1) / (s[-1] - s[0]) for s in stamps)
    return {"streams": streams, "aggregate_tok_s": window if window is not None else overall,
            "window_tok_s": window, "overall_tok_s": overall,
            "per_stream_tok_s": round(per, 2)}


def ttft(server: Server, tok, prefix_tokens: int, repeats: int) -> dict:
    cold, hit = [], []
    before = server.metrics()["lattice_prefix_cache_hit_tokens_total"]
    for r in range(repeats):
        # a salt token first: the prefix is cold for the first request of every pair
        prefix = [random.Random(r).randrange(1000, 20000)] + corpus_ids(tok, prefix_tokens - 1,
                                                                         offset=7 + r)
        for target, suffix_offset in ((cold, 1), (hit, 2)):
            prompt = prefix + corpus_ids(tok, 16, offset=5000 + 10 * r + suffix_offset)
            stamps: list[float] = []
            t = time.perf_counter()
            server.stream(prompt, 1, stamps)
            target.append(stamps[0] - t)
    hits = server.metrics()["lattice_prefix_cache_hit_tokens_total"] - before
    c, h = statistics.median(cold), statistics.median(hit)
    return {"prefix_tokens": prefix_tokens, "ttft_cold_s": round(c, 4),
            "ttft_hit_s": round(h, 4), "hit_over_cold": round(h / c, 4),
            "metrics_prefix_hit_tokens": int(hits)}


def itl_under_prefill(server: Server, tok, streams: int, long_tokens: int,
                      baseline_s: float) -> dict:
    stamps = [[] for _ in range(streams)]
    prompts = [corpus_ids(tok, 32, offset=300 + i) for i in range(streams)]
    def decoder(prompt, s):
        try:
            server.stream(prompt, 4096, s)
        except Exception:  # the server stops at the end of the bench, mid-stream
            pass
    threads = [threading.Thread(target=decoder, args=(p, s), daemon=True)
               for p, s in zip(prompts, stamps)]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 3:
        time.sleep(0.01)
    base_start = time.perf_counter()
    time.sleep(baseline_s)
    pacer_before = server.metrics()
    long_start = time.perf_counter()
    long_stamps: list[float] = []
    server.stream(corpus_ids(tok, long_tokens, offset=900), 1, long_stamps)
    long_end = long_stamps[0]
    pacer_after = server.metrics()
    time.sleep(0.5)
    gaps_base, gaps_during = [], []
    for s in stamps:
        for a, b in zip(s, s[1:]):
            if base_start <= a and b <= long_start:
                gaps_base.append(b - a)
            elif long_start <= a and b <= long_end:
                gaps_during.append(b - a)
    result = {"streams": streams, "long_prompt_tokens": long_tokens,
              "prefill_s": round(long_end - long_start, 3),
              "itl_before_ms": round(1e3 * statistics.mean(gaps_base), 2),
              "itl_during_ms": round(1e3 * statistics.mean(gaps_during), 2),
              "itl_during_p90_ms": round(1e3 * sorted(gaps_during)[int(0.9 * len(gaps_during))], 2)}
    result["itl_rise"] = round(result["itl_during_ms"] / result["itl_before_ms"], 3)
    # the server's own view: its prefill pacer's estimates, and the steps the prefill took
    steps = pacer_after["lattice_engine_steps_total"] - pacer_before["lattice_engine_steps_total"]
    result["server_steps_during"] = int(steps)
    result["pacer_decode_step_ms"] = round(
        1e3 * pacer_before["lattice_prefill_pacer_decode_step_seconds"], 2)
    result["pacer_token_ms"] = round(1e3 * pacer_after["lattice_prefill_pacer_token_seconds"], 3)
    result["pacer_budget_tokens"] = int(pacer_after["lattice_prefill_pacer_budget_tokens"])
    return result, threads


BLOCK_SIZE = 16  # `lattice serve`'s default server.block_size


def prefix_routing(server: Server, tok, groups: int, size: int, prefix_tokens: int) -> dict:
    """Requests in groups sharing a cold prefix, one at a time in a shuffled order: the
    share of each group's second-and-later requests whose prompt came from a prefix cache."""
    rng = random.Random(0)
    salt = random.Random().randrange(1000, 20000)  # cold prefixes on every run
    prefixes = [[salt + g] + corpus_ids(tok, prefix_tokens - 1, offset=40 + 13 * g)
                for g in range(groups)]
    order = [(g, k) for g in range(groups) for k in range(size)]
    rng.shuffle(order)
    full = prefix_tokens // BLOCK_SIZE * BLOCK_SIZE  # the cacheable part of the prefix
    before = server.metric_by_replica("lattice_prefix_cache_hit_tokens_total")
    received0 = server.metric_by_replica("lattice_requests_received_total")
    seen: set[int] = set()
    later = hits = 0
    for g, k in order:
        prompt = prefixes[g] + corpus_ids(tok, 24, offset=3000 + 31 * g + k)
        usage = server.complete(prompt)["usage"]
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        if g in seen:
            later += 1
            hits += cached >= full
        seen.add(g)
    after = server.metric_by_replica("lattice_prefix_cache_hit_tokens_total")
    received = server.metric_by_replica("lattice_requests_received_total")
    return {"groups": groups, "group_size": size, "prefix_tokens": prefix_tokens,
            "later_requests": later, "later_hits": hits,
            "hit_rate": round(hits / later, 4) if later else None,
            "metrics_hit_tokens": int(sum(after.values()) - sum(before.values())),
            "requests_by_replica": sorted(int(v - received0.get(r, 0))
                                          for r, v in received.items())}


def replicas_main(args, tok, result: dict) -> None:
    """The --replicas N measurements (see the module doc)."""
    routings = ("prefix", "round-robin") if args.routing == "both" else (args.routing,)
    skip = set(args.skip.split(","))
    if "prefix" not in skip:
        rows = {}
        for routing in routings:
            server = Server(args, args.replicas, args.threads, routing)
            try:
                rows[routing] = r = prefix_routing(server, tok, args.groups, args.group_size,
                                                   args.group_prefix_tokens)
            finally:
                server.stop()
            print(f"{routing} routing over {args.replicas} replicas: {r['later_hits']}/"
                  f"{r['later_requests']} later requests of {r['groups']} groups sharing "
                  f"{r['prefix_tokens']}-token prefixes hit the prefix cache "
                  f"({r['hit_rate']:.0%}; {r['metrics_hit_tokens']} hit tokens in the "
                  f"replicas' /metrics; requests per replica {r['requests_by_replica']})  "
                  f"(load {os.getloadavg()[0]:.2f})")
        result["prefix_routing"] = rows
    if "throughput" not in skip:
        rows = {}
        for label, count, threads in ((f"{args.replicas}x{args.threads}", args.replicas,
                                       args.threads),
                                      (f"1x{args.replicas * args.threads}", 1,
                                       args.replicas * args.threads)):
            server = Server(args, count, threads, routings[0])
            try:
                server.stream(corpus_ids(tok, 8), 4, [])  # warm-up
                rows[label] = r = throughput(server, tok, args.streams[-1], args.gen_tokens,
                                             prompt_tokens=BLOCK_SIZE - 4)
                r["requests_by_replica"] = sorted(
                    int(v) for v in server.metric_by_replica(
                        "lattice_requests_received_total").values())
            finally:
                server.stop()
            print(f"{label} (replicas x threads), {r['streams']} streams: "
                  f"{r['aggregate_tok_s']} tok/s aggregate, {r['per_stream_tok_s']} tok/s per "
                  f"stream; requests per replica {r['requests_by_replica']}  "
                  f"(load {os.getloadavg()[0]:.2f})")
        a, b = rows.values()
        result["replica_throughput"] = rows
        result["replicas_over_threads"] = round(a["aggregate_tok_s"] / b["aggregate_tok_s"], 3)
        print(f"aggregate decode ratio {' / '.join(rows)}: {result['replicas_over_threads']}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--quant", default="q8_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,8", help="comma-separated stream counts")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--itl-streams", type=int, default=4)
    p.add_argument("--long-prompt-tokens", type=int, default=2000)
    p.add_argument("--kv-cache-tokens", type=int, default=16384)
    p.add_argument("--step-tokens", type=int, default=512)
    p.add_argument("--interleave-tokens", type=int, default=64)
    p.add_argument("--max-itl-rise", type=float, default=2.0,
                   help="the server's prefill pacing target (0: off, fixed interleave)")
    p.add_argument("--client", choices=("http", "openai"), default="http",
                   help="how the streams are read (see the module doc)")
    p.add_argument("--skip", default="",
                   help="comma-separated: throughput,ttft,itl (with --replicas: prefix,"
                        "throughput)")
    p.add_argument("--replicas", type=int, default=None,
                   help="replicas on Ray Serve (lattice serve --replicas; --threads each): "
                        "prefix routing and replicas-vs-threads throughput instead")
    p.add_argument("--routing", choices=("prefix", "round-robin", "both"), default="both",
                   help="with --replicas: the routing(s) the prefix measurement runs")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--group-prefix-tokens", type=int, default=500)
    add_results_option(p)
    args = p.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",") if s]
    skip = set(args.skip.split(","))
    tok = load_tokenizer(args.model)
    result = {"model": args.model, "quant": args.quant, "threads": args.threads, "client": args.client,
              "interleave_tokens": args.interleave_tokens, "max_itl_rise": args.max_itl_rise,
              "load_avg_start": os.getloadavg()[0]}
    if args.replicas is not None:
        result.update(replicas=args.replicas, routing=args.routing)
        replicas_main(args, tok, result)
        result["load_avg_end"] = os.getloadavg()[0]
        emit(result, args.results, args.threads)
        return 0
    server = Server(args)
    try:
        server.stream(corpus_ids(tok, 16), 4, [])  # warm-up
        if "throughput" not in skip:
            rows = [throughput(server, tok, n, args.gen_tokens) for n in args.streams]
            for r in rows:
                print(f"decode {r['streams']} streams: {r['aggregate_tok_s']} tok/s aggregate "
                      f"(all-decoding window {r['window_tok_s']}, whole span "
                      f"{r['overall_tok_s']}), {r['per_stream_tok_s']} tok/s per stream  "
                      f"(load {os.getloadavg()[0]:.2f})")
            result["throughput"] = rows
            if len(rows) > 1:
                result["throughput_ratio"] = round(rows[-1]["aggregate_tok_s"] /
                                                   rows[0]["aggregate_tok_s"], 3)
                print(f"aggregate ratio {rows[-1]['streams']} / {rows[0]['streams']} streams: "
                      f"{result['throughput_ratio']}x")
        if "ttft" not in skip:
            t = ttft(server, tok, args.prefix_tokens, args.repeats)
            print(f"TTFT with a {t['prefix_tokens']}-token prefix: cold {t['ttft_cold_s']} s, "
                  f"prefix hit {t['ttft_hit_s']} s ({t['hit_over_cold']:.1%} of cold; "
                  f"{t['metrics_prefix_hit_tokens']} hit tokens in /metrics)  "
                  f"(load {os.getloadavg()[0]:.2f})")
            result["ttft"] = t
        if "itl" not in skip:
            # the same length of prompt on an idle server first (other text: no prefix hit)
            alone: list[float] = []
            start = time.perf_counter()
            server.stream(corpus_ids(tok, args.long_prompt_tokens, offset=2900), 1, alone)
            alone_s = alone[0] - start
            r, _ = itl_under_prefill(server, tok, args.itl_streams, args.long_prompt_tokens, 3.0)
            r["prefill_alone_s"] = round(alone_s, 3)
            r["prefill_over_alone"] = round(r["prefill_s"] / alone_s, 3)
            print(f"ITL of {r['streams']} streams: {r['itl_before_ms']} ms before, "
                  f"{r['itl_during_ms']} ms (p90 {r['itl_during_p90_ms']}) while a "
                  f"{r['long_prompt_tokens']}-token prompt prefilled in {r['prefill_s']} s: "
                  f"{r['itl_rise']}x  (load {os.getloadavg()[0]:.2f})")
            print(f"  that prompt's first token: {r['prefill_s']} s while {r['streams']} streams "
                  f"decode, {r['prefill_alone_s']} s alone: {r['prefill_over_alone']}x")
            print(f"  server: {r['server_steps_during']} steps; pacer decode step "
                  f"{r['pacer_decode_step_ms']} ms, prefill token {r['pacer_token_ms']} ms, "
                  f"budget {r['pacer_budget_tokens']} tokens")
            result["itl"] = r
    finally:
        result["server_peak_rss_mb"] = server.stop()  # also ends the ITL decoders' streams
    print(f"server peak RSS {result['server_peak_rss_mb']} MB")
    result["load_avg_end"] = os.getloadavg()[0]
    emit(result, args.results, args.threads)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # the ITL decoder threads may still be reading their dead streams
