"""/metrics in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

from ..batching import BatchRunner, Histogram


def _histogram(lines: list[str], name: str, help_text: str, h: Histogram) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, count in zip(h.BUCKETS, h.counts):
        running += count
        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {h.n}')
    lines.append(f"{name}_sum {h.total:.6f}")
    lines.append(f"{name}_count {h.n}")


def _seconds(value) -> str:
    return "NaN" if value is None else f"{value:.6f}"


def render(runner: BatchRunner, http: dict[str, int]) -> str:
    s, kv = runner.stats, runner.cache.stats()
    lines: list[str] = []

    def metric(name, kind, help_text, value, labels=""):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f"{name}{labels} {value}"])

    metric("lattice_requests_received_total", "counter", "Requests queued.", s.requests_added)
    lines += ["# HELP lattice_requests_finished_total Requests finished, by reason.",
              "# TYPE lattice_requests_finished_total counter"]
    for reason in ("stop", "length", "abort"):
        lines.append(f'lattice_requests_finished_total{{reason="{reason}"}} '
                     f'{s.requests_finished.get(reason, 0)}')
    metric("lattice_prompt_tokens_total", "counter", "Prompt tokens of answered requests.",
           s.prompt_tokens)
    metric("lattice_generation_tokens_total", "counter", "Tokens generated.",
           s.generated_tokens)
    metric("lattice_computed_tokens_total", "counter",
           "Tokens run through the model (prefill and decode).", s.tokens_computed)
    metric("lattice_engine_steps_total", "counter", "Batched forward passes.", s.steps)
    metric("lattice_preemptions_total", "counter", "Sequences preempted (recomputed later).",
           runner.scheduler.preemptions)
    metric("lattice_requests_running", "gauge", "Sequences in the running batch.",
           runner.num_running())
    metric("lattice_requests_waiting", "gauge", "Sequences waiting (queue depth).",
           runner.num_waiting())
    metric("lattice_kv_blocks_total", "gauge", "KV cache blocks in the pool.", kv["blocks_total"])
    metric("lattice_kv_blocks_used", "gauge", "KV blocks referenced by sequences.",
           kv["blocks_used"])
    metric("lattice_kv_blocks_cached", "gauge", "Unreferenced KV blocks kept for prefix reuse.",
           kv["blocks_cached"])
    metric("lattice_prefix_cache_queried_tokens_total", "counter",
           "Prompt tokens looked up in the prefix cache.", kv["prefix_queried_tokens"])
    metric("lattice_prefix_cache_hit_tokens_total", "counter",
           "Prompt tokens served from the prefix cache.", kv["prefix_hit_tokens"])
    metric("lattice_prefix_cache_hit_rate", "gauge", "Hit tokens / queried tokens.",
           f"{kv['prefix_hit_rate']:.6f}")
    metric("lattice_image_encodes_total", "counter", "Images run through the vision encoder.",
           runner.encoded.encodes)
    metric("lattice_image_encodes_skipped_total", "counter",
           "Images not encoded again: their tokens' K/V was in the prefix cache, or their "
           "embeddings in the encoded-image cache.", runner.encoded.skipped)
    pacer = runner.pacer  # why prefill chunks are the size they are (NaN until measured)
    metric("lattice_prefill_pacer_decode_step_seconds", "gauge",
           "Running estimate of a decode-only step.", _seconds(pacer.t_decode))
    metric("lattice_prefill_pacer_token_seconds", "gauge",
           "Running estimate of one prefill token's extra cost in a mixed step.",
           _seconds(pacer.per_token))
    metric("lattice_prefill_pacer_budget_tokens", "gauge",
           "Prefill tokens the next mixed step may carry.", pacer.budget())
    _histogram(lines, "lattice_time_to_first_token_seconds", "Time to first token.", s.ttft)
    _histogram(lines, "lattice_inter_token_latency_seconds", "Time between tokens of a request.",
               s.itl)
    lines += ["# HELP lattice_http_responses_total HTTP responses by status code.",
              "# TYPE lattice_http_responses_total counter"]
    for status, count in sorted(http.items()):
        lines.append(f'lattice_http_responses_total{{status="{status}"}} {count}')
    return "\n".join(lines) + "\n"
