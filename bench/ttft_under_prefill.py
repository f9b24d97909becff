"""Time to first token of a short request while a long prompt prefills.

    python bench/ttft_under_prefill.py [--model smollm2-135m] [--long-tokens 8000]

Starts `lattice serve` in a subprocess; for each of --delays, sends a --long-tokens-token
prompt (random token ids, so no prefix is cached; max_tokens 1), waits that long (the
long prefill is then under way), sends a short streaming request and measures the time to
its first token, and the long request's total time. Prints one line per round, a summary
line, then (as its very last line) one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from provenance import emit, peak_rss_mb  # bench/, next to this file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, stream: bool):
    """(seconds to the first token or the answer, total seconds, status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": stream}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    if stream:
        for line in resp:
            if line.startswith(b"data: {") and first is None:
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text"):
                    first = time.perf_counter() - start
    else:
        resp.read()
        first = time.perf_counter() - start
    total = time.perf_counter() - start
    conn.close()
    return first, total, resp.status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--long-tokens", type=int, default=8000)
    ap.add_argument("--delays", default="0.5,2,4", help="seconds after the long request")
    ap.add_argument("--extra", default="", help="more `lattice serve` arguments")
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "lattice_engine.cli", "serve", args.model, "--port",
           str(port), "--log-level", "warning", *args.extra.split()]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        model = "smollm2-135m" if args.model == "smollm2-135m" else args.model
        post(port, {"model": model, "prompt": "Warm up", "max_tokens": 2}, False)
        rng = random.Random(0)
        rounds = []
        for delay in (float(d) for d in args.delays.split(",")):
            long_body = {"model": model, "max_tokens": 1,
                         "prompt": [rng.randrange(1000, 40000) for _ in range(args.long_tokens)]}
            result = {}
            long_thread = threading.Thread(
                target=lambda: result.update(long=post(port, long_body, False)))
            long_thread.start()
            time.sleep(delay)
            ttft, _, status = post(port, {"model": model, "prompt": "The capital of France is",
                                          "max_tokens": 8, "temperature": 0}, True)
            long_thread.join()
            long_total = result["long"][1]
            rounds.append({"delay": delay, "ttft": round(ttft, 3), "status": status,
                           "long_seconds": round(long_total, 2)})
            print(f"short request sent {delay:g} s into a {args.long_tokens}-token prefill: "
                  f"TTFT {ttft:.2f} s (the long request took {long_total:.1f} s)", flush=True)
        worst = max(r["ttft"] for r in rounds)
        print(f"{args.model}: short-request TTFT during a {args.long_tokens}-token prefill: "
              f"median {statistics.median(r['ttft'] for r in rounds):.2f} s, worst "
              f"{worst:.2f} s over {len(rounds)} rounds", flush=True)
        row = {"model": args.model, "long_tokens": args.long_tokens, "rounds": rounds,
               "worst_ttft": worst, "server_peak_rss_mb": peak_rss_mb(server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
