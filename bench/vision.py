"""Vision encoder speed at the Qwen3.5-0.8B vision shape (depth 12, hidden 768, patch 16,
temporal patch 2, merge 2, out 1024) with random weights: lattice-vision (C kernels, and
optionally the numpy reference) next to transformers float32 `Qwen3_5VisionModel`, same
weights, same 448x448 image, same run.

    python bench/vision.py [--threads 2] [--runs 3] [--size 448] [--numpy]

Both take the processor's pixel patches (preprocessing is timed apart: `prepare_ms`).
Reports each engine's median encode time, the speed ratio (transformers / lattice) and the
max |diff| of the merged tokens. Needs torch, transformers and the vision plugin. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit  # bench/, next to this file

CONFIG = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "configs" / \
    "qwen3_5-0.8b.config.json"


class Checkpoint:
    """What `LoadedQwenVision` reads: config, tensors (name -> loader), shapes, source."""

    def __init__(self, config: dict, arrays: dict):
        self.config = config
        self.tensors = {k: (lambda a=a: a) for k, a in arrays.items()}
        self.shapes = {k: a.shape for k, a in arrays.items()}
        self.source = ""


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--numpy", action="store_true", help="also time the numpy reference")
    add_results_option(parser)
    args = parser.parse_args()

    import torch
    import transformers
    from PIL import Image
    from lattice_engine import kernels
    from lattice_vision.encoder import LoadedQwenVision

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    kernels.set_threads(args.threads)
    full = json.loads(Path(args.config).read_text())
    vision_cfg = transformers.Qwen3_5VisionConfig(**{k: v for k, v in full["vision_config"].items()
                                                      if k != "model_type"})
    torch.manual_seed(0)
    hf = transformers.Qwen3_5VisionModel._from_config(vision_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # random weights at a realistic scale
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(0.02 * torch.randn(p.shape))
    arrays = {f"model.visual.{k}": v.float().numpy() for k, v in hf.state_dict().items()}
    ours = LoadedQwenVision(Checkpoint(full, arrays), backend="native")
    reference = LoadedQwenVision(Checkpoint(full, arrays), backend="numpy") if args.numpy else None

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    start = time.perf_counter()
    prepared = ours.prepare(buf.getvalue())
    prepare_ms = (time.perf_counter() - start) * 1000
    patches, grid = prepared.payload
    pv, thw = torch.from_numpy(patches), torch.tensor([grid])

    ours.encode(prepared)  # warm-up (first touch of the weights, thread pool start)
    t_ours, enc = timed(lambda: ours.encode(prepared), args.runs)
    hf(pv, grid_thw=thw)
    t_hf, out = timed(lambda: hf(pv, grid_thw=thw).pooler_output.numpy(), args.runs)
    row = {"bench": "vision", "image": f"{args.size}x{args.size}", "patches": int(len(patches)),
           "tokens": int(enc.num_tokens), "threads": args.threads,
           "lattice_encode_s": round(t_ours, 4), "transformers_encode_s": round(t_hf, 4),
           "speedup_vs_transformers": round(t_hf / t_ours, 3),
           "max_abs_diff": float(np.abs(enc.embeds - out).max()),
           "prepare_ms": round(prepare_ms, 2)}
    if reference is not None:
        t_np, enc_np = timed(lambda: reference.encode(prepared), args.runs)
        row["numpy_encode_s"] = round(t_np, 4)
        row["numpy_max_abs_diff"] = float(np.abs(enc_np.embeds - out).max())
    try:
        import os
        row["load_average"] = os.getloadavg()[0]
    except OSError:
        pass
    print(f"{'engine':<14}{'encode s':>10}")
    print(f"{'lattice':<14}{t_ours:>10.3f}")
    print(f"{'transformers':<14}{t_hf:>10.3f}")
    if reference is not None:
        print(f"{'numpy ref':<14}{row['numpy_encode_s']:>10.3f}")
    print(f"speedup {row['speedup_vs_transformers']:.2f}x, max |diff| {row['max_abs_diff']:.2e}, "
          f"load average {row.get('load_average', float('nan')):.2f} (a shared machine's "
          f"timings are distorted by load)")
    emit(row, args.results, threads=args.threads)


if __name__ == "__main__":
    main()
