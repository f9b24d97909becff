"""/metrics in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

from typing import Optional

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


SPECULATION = (  # (metric, kind, stats key, help)
    ("lattice_spec_verifies_total", "counter", "verifies", "Speculative verify rows run."),
    ("lattice_spec_draft_tokens_total", "counter", "drafted", "Draft tokens proposed."),
    ("lattice_spec_accepted_tokens_total", "counter", "accepted", "Draft tokens kept."),
    ("lattice_spec_emitted_tokens_total", "counter", "emitted",
     "Tokens emitted by verifies (kept drafts plus the token after them)."),
    ("lattice_spec_acceptance_rate", "gauge", "acceptance_rate",
     "Kept draft tokens / proposed draft tokens."),
    ("lattice_spec_mean_accepted_per_verify", "gauge", "mean_accepted_per_verify",
     "Tokens emitted per verify."),
    ("lattice_spec_draft_seconds_total", "counter", "draft_seconds", "Seconds spent drafting."),
    ("lattice_spec_verify_seconds_total", "counter", "verify_seconds",
     "Seconds of forward passes spent on verify rows (their share of each step)."),
    ("lattice_spec_drafter_failures_total", "counter", "failures",
     "Drafter calls that failed (each ended its request)."),
)


def _speculation(lines: list[str], by_method: dict) -> None:
    """Speculative decoding counters, one series per drafter method (none when unused)."""
    if not by_method:
        return
    for name, kind, key, help_text in SPECULATION:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for method, stats in by_method.items():
            value = stats[key]
            shown = f"{value:.6f}" if isinstance(value, float) else str(value)
            lines.append(f'{name}{{method="{method}"}} {shown}')


class EmbeddingStats:
    """Counters of /v1/embeddings (updated on the event loop only)."""

    def __init__(self):
        self.requests = self.inputs = self.tokens = 0

    def add(self, inputs: int, tokens: int) -> None:
        self.requests += 1
        self.inputs += inputs
        self.tokens += tokens


def render(runner: Optional[BatchRunner], http: dict[str, int],
           embeddings: Optional[EmbeddingStats] = None, drift=None,
           drift_errors: int = 0) -> str:
    """The metrics text; `runner` is None for an embedding-only model (no generation
    metrics), `drift` the server's DriftDetector when it watches the inputs."""
    lines: list[str] = []

    def metric(name, kind, help_text, value, labels=""):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f"{name}{labels} {value}"])

    if runner is not None:
        _generation(lines, metric, runner)
    if embeddings is not None:
        metric("lattice_embedding_requests_total", "counter", "Embedding requests answered.",
               embeddings.requests)
        metric("lattice_embedding_inputs_total", "counter", "Inputs embedded.",
               embeddings.inputs)
        metric("lattice_embedding_tokens_total", "counter", "Tokens of the inputs embedded.",
               embeddings.tokens)
    if drift is not None:
        snap = drift.snapshot()
        metric("lattice_drift_distance", "gauge", "Last Sinkhorn divergence between the "
               "reference window and the recent window of input embeddings (NaN until the "
               "first check).", "NaN" if snap["distance"] is None else f"{snap['distance']:.9g}")
        metric("lattice_drift_threshold", "gauge", "The divergence above which the alarm is "
               "raised (NaN while the reference is filling).",
               "NaN" if snap["threshold"] is None else f"{snap['threshold']:.9g}")
        metric("lattice_drift_alarm", "gauge", "1 while the last check found drift.",
               int(snap["alarm"]))
        lines += ["# HELP lattice_drift_state The detector's state (1 for the current one).",
                  "# TYPE lattice_drift_state gauge"]
        for name in ("warming", "stable", "drift"):
            lines.append(f'lattice_drift_state{{state="{name}"}} {int(snap["state"] == name)}')
        metric("lattice_drift_observations_total", "counter", "Embeddings observed.",
               snap["observations"])
        metric("lattice_drift_checks_total", "counter", "Drift checks run.", snap["checks"])
        metric("lattice_drift_errors_total", "counter", "Observations the detector failed "
               "on (logged).", drift_errors)
    lines += ["# HELP lattice_http_responses_total HTTP responses by status code.",
              "# TYPE lattice_http_responses_total counter"]
    for status, count in sorted(http.items()):
        lines.append(f'lattice_http_responses_total{{status="{status}"}} {count}')
    return "\n".join(lines) + "\n"


def _generation(lines: list[str], metric, runner: BatchRunner) -> None:
    s, kv = runner.stats, runner.cache.stats()

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
    _speculation(lines, runner.speculation_stats())
    _histogram(lines, "lattice_time_to_first_token_seconds", "Time to first token.", s.ttft)
    _histogram(lines, "lattice_inter_token_latency_seconds", "Time between tokens of a request.",
               s.itl)
