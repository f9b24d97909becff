"""Real OpenAI-API clients against `lattice serve`: lm-evaluation-harness and the `llm` CLI.

    pip install "lm_eval[api]" llm   # into the same environment as lattice-engine
    python scripts/external_clients.py [--model smollm2-135m] [--port 8765]

1. Starts `lattice serve MODEL` as a subprocess (what a user runs).
2. lm-evaluation-harness, model `local-completions` pointed at it, runs two tasks built
   here from local JSONL files (no hub access): `lattice_capitals`, a multiple-choice
   log-likelihood task (echo + logprobs + max_tokens, token-id prompts in batches), and
   `lattice_arith`, a generate-until task (batched string prompts, stop strings). The
   tokenizer lm_eval needs for context lengths is the served model's, saved as an HF
   folder.
3. Scores every (context, continuation) lm_eval sent with the engine's own unbatched
   forward, the way `lattice ppl` scores tokens (log-softmax of the row before each token),
   and prints the largest difference from lm_eval's numbers.
4. `llm` with an `extra-openai-models.yaml` entry for the server asks one question
   (chat, then completion) and prints the answers.

Prints one JSON line of figures (with provenance) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

CAPITALS = [("France", "Paris", ["London", "Berlin"]), ("Japan", "Tokyo", ["Beijing", "Seoul"]),
            ("Italy", "Rome", ["Madrid", "Athens"]), ("Germany", "Berlin", ["Vienna", "Paris"]),
            ("Spain", "Madrid", ["Lisbon", "Rome"]), ("Canada", "Ottawa", ["Toronto", "Oslo"]),
            ("Egypt", "Cairo", ["Lagos", "Tunis"]), ("Russia", "Moscow", ["Kyiv", "Warsaw"]),
            ("China", "Beijing", ["Tokyo", "Hanoi"]), ("Greece", "Athens", ["Sofia", "Rome"]),
            ("Norway", "Oslo", ["Stockholm", "Helsinki"]), ("Peru", "Lima", ["Quito", "Bogota"])]
ARITH = [(a, b) for a, b in [(2, 2), (3, 4), (10, 5), (7, 1), (6, 3), (9, 9), (12, 8), (5, 0)]]

CAPITALS_YAML = """task: lattice_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "The capital of {{{{country}}}} is"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
ARITH_YAML = """task: lattice_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: What is {{{{a}}}} plus {{{{b}}}}?\\nAnswer:"
doc_to_target: "{{{{sum}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tasks(folder: Path) -> None:
    with open(folder / "capitals.jsonl", "w") as f:
        for country, answer, others in CAPITALS:
            choices = sorted([answer] + others)
            f.write(json.dumps({"country": country, "choices": [" " + c for c in choices],
                                "answer": choices.index(answer)}) + "\n")
    with open(folder / "arith.jsonl", "w") as f:
        for a, b in ARITH:
            f.write(json.dumps({"a": a, "b": b, "sum": a + b}) + "\n")
    (folder / "capitals.yaml").write_text(CAPITALS_YAML.format(data=folder / "capitals.jsonl"))
    (folder / "arith.yaml").write_text(ARITH_YAML.format(data=folder / "arith.jsonl"))


def save_hf_tokenizer(engine, folder: Path) -> None:
    """The served model's tokenizer as an HF folder (tokenizer.json + config), which
    lm_eval's AutoTokenizer loads offline."""
    folder.mkdir(parents=True, exist_ok=True)
    engine.tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    config = {k: v for k, v in engine.tokenizer.config.items() if k != "chat_template"}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's split of a request into context and continuation ids (trailing spaces of
    the context move to the continuation; the whole is encoded once)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def engine_score(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of the continuation's log-probabilities from one unbatched forward: what the
    perplexity code computes for those tokens."""
    from lattice_engine.sampling import log_softmax
    ids = np.asarray(ctx + cont, np.int64)
    cache = model.make_cache(batch=1, capacity=ids.size)
    logits = model.logits(model.hidden_states(ids[None, :], cache))[0]
    rows = log_softmax(logits[len(ctx) - 1:ids.size - 1])
    return float(rows[np.arange(len(cont)), cont].sum())


def wait_healthy(base: str, proc, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lattice serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("lattice serve did not become healthy")


def run_lm_eval(base: str, model_name: str, tokenizer_dir: Path, tasks_dir: Path,
                concurrent: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager
    args = (f"model={model_name},base_url={base}/v1/completions,num_concurrent={concurrent},"
            f"max_retries=1,tokenizer_backend=huggingface,tokenizer={tokenizer_dir},"
            f"tokenized_requests=True,timeout=600")
    return lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                   tasks=["lattice_capitals", "lattice_arith"],
                                   task_manager=TaskManager(include_path=str(tasks_dir)),
                                   log_samples=True, batch_size=4)


def run_llm(base: str, model_name: str, home: Path) -> dict:
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: lattice-chat\n  model_name: {model_name}\n  api_base: \"{base}/v1\"\n"
        f"- model_id: lattice-complete\n  model_name: {model_name}\n  api_base: \"{base}/v1\"\n"
        f"  completion: true\n")
    env = {**os.environ, "LLM_USER_PATH": str(home), "OPENAI_API_KEY": "none"}
    out = {}
    for model_id, prompt in (("lattice-chat", "What is the capital of France? One word."),
                             ("lattice-complete", "The capital of France is")):
        proc = subprocess.run(["llm", "-m", model_id, "-o", "max_tokens", "12", "-o",
                               "temperature", "0", prompt], env=env, capture_output=True,
                              text=True, timeout=600)
        out[model_id] = {"returncode": proc.returncode, "answer": proc.stdout.strip(),
                         "stderr": proc.stderr.strip()[-300:]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--skip-llm", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lattice_engine.engine import Engine
    from provenance import provenance

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "lattice_engine.cli", "serve", args.model,
                              "--port", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        engine = Engine.load(args.model)
        wait_healthy(base, server)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_tasks(tmp)
            save_hf_tokenizer(engine, tmp / "tokenizer")
            started = time.perf_counter()
            results = run_lm_eval(base, args.model, tmp / "tokenizer", tmp, args.concurrent)
            lm_eval_seconds = time.perf_counter() - started
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
            worst, scored = 0.0, 0
            for sample in results["samples"]["lattice_capitals"]:
                for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
                    ctx, cont = encode_pair(hf, context, continuation)
                    want = engine_score(engine.model, ctx, cont)
                    worst = max(worst, abs(float(resp[0][0]) - want))
                    scored += 1
            arith = results["samples"]["lattice_arith"]
            llm = {} if args.skip_llm else run_llm(base, args.model, tmp)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    row = {"model": args.model,
           "capitals_acc": results["results"]["lattice_capitals"]["acc,none"],
           "capitals_requests": scored,
           "loglik_max_abs_diff_vs_engine": worst,
           "arith_exact_match": results["results"]["lattice_arith"].get("exact_match,strip"),
           "arith_first_answer": arith[0]["resps"][0][0] if arith else None,
           "lm_eval_seconds": round(lm_eval_seconds, 1),
           "load_average": os.getloadavg()[0], "llm": llm, **provenance()}
    print(json.dumps(row))
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
